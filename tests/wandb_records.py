"""Reads a W&B run file (``run-<id>.wandb``) without the W&B service: the test's independent view of what was logged.

The file is a 7-byte header (``:W&B``, magic, version) followed by LevelDB-log records in 32 KiB blocks: each record a
7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) and a serialized ``wandb_internal_pb2.Record``.
"""
import glob
import json
import os
import struct

BLOCK = 32 * 1024
HEADER = 7


def read_records(path):
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + payload)
            records.append(record)
            pending = b""
        elif kind in (2, 3):
            pending += payload
    return records


def offline_run(wandb_dir):
    """``(run record, [history rows as dicts])`` of the one offline run under ``wandb_dir``."""
    paths = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(paths) == 1, paths
    records = read_records(paths[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    return run, rows
