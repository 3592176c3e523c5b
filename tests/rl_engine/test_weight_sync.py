"""The weight-sync transport: buckets, the wire layout, and real gloo channels (PP stages in parallel)."""
import threading

import pytest
import torch

from megatron_onereason.generation.weight_sync import (
    buckets,
    flatten_bucket,
    join_channel,
    receive_weights,
    send_weights,
    serve_channel,
    unflatten_bucket,
)


def named(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    out = []
    for i in range(n):
        shape = (3 + i, 5) if i % 2 else (7 + i,)  # odd sizes: offsets need alignment
        t = torch.randn(shape, generator=g).to(dtypes[i % len(dtypes)])
        out.append((f"model.layers.{seed}.t{i}", t))
    return out


def test_flatten_round_trip_is_bit_identical_across_dtypes():
    bucket = named(0)
    meta, payload = flatten_bucket(bucket, torch.device("cpu"))
    back = unflatten_bucket(meta, payload)
    assert [n for n, _ in back] == [n for n, _ in bucket]
    for (_, a), (_, b) in zip(bucket, back):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_buckets_respect_the_byte_limit_and_keep_order():
    tensors = [(f"t{i}", torch.zeros(100, dtype=torch.float32)) for i in range(10)]  # 400 B each (aligned)
    parts = list(buckets(tensors, 1000))
    assert [len(p) for p in parts] == [2, 2, 2, 2, 2]
    assert [n for p in parts for n, _ in p] == [n for n, _ in tensors]
    big = [("big", torch.zeros(1000)), ("small", torch.zeros(1))]
    assert [len(p) for p in buckets(big, 100)] == [1, 1]  # an oversized tensor travels alone
    with pytest.raises(ValueError):
        list(buckets(tensors, 0))


def test_two_stages_send_in_parallel_to_two_receivers_over_gloo():
    """Two senders (PP stages) × two receivers, one channel per stage, small buckets: every tensor arrives intact."""
    stages = [named(1, 8), named(2, 5)]
    served = [serve_channel(f"test/pp{s}", 3, "gloo", timeout_s=60) for s in range(2)]
    specs = [spec for spec, _ in served]
    received = {1: {}, 2: {}}
    results, errors = {}, []

    def sender(s):
        try:
            channel = join_channel(specs[s], 0, served[s][1])
            results[("send", s)] = [send_weights(channel, stages[s], bucket_bytes=256) for _ in range(2)]
        except BaseException as e:
            errors.append(e)

    def receiver(r):
        try:
            channels = [join_channel(spec, r) for spec in specs]
            for sync in range(2):  # the channel stays open between syncs
                got = received[r].setdefault(sync, {})
                results[("recv", r, sync)] = receive_weights(
                    channels, lambda bucket: got.update({n: t.clone() for n, t in bucket}))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=sender, args=(s,)) for s in range(2)]
    threads += [threading.Thread(target=receiver, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    expected = dict(stages[0] + stages[1])
    for r in (1, 2):
        for sync in range(2):
            got = received[r][sync]
            assert set(got) == set(expected)
            for name, t in expected.items():
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
            stats = results[("recv", r, sync)]
            assert stats.tensors == len(expected)
    sent = [results[("send", s)][0] for s in range(2)]
    assert sum(s.bytes for s in sent) == results[("recv", 1, 0)].bytes
    assert all(s.buckets > 1 for s in sent)  # 256-byte buckets: several per stage


def test_a_failing_loader_does_not_hang_the_senders():
    spec, store = serve_channel("test/fail", 2, "gloo", timeout_s=60)
    sent = {}

    def sender():
        sent["stats"] = send_weights(join_channel(spec, 0, store), named(3), bucket_bytes=64)

    t = threading.Thread(target=sender)
    t.start()
    channel = join_channel(spec, 1)

    def load(bucket):
        raise KeyError("no such parameter")

    with pytest.raises(KeyError):
        receive_weights([channel], load)
    t.join(timeout=60)
    assert sent["stats"].tensors == 6
