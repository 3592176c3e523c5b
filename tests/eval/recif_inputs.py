"""RecIF-Bench test inputs built from the real fixture: 100 `ad` samples rendered and scored by OpenOneRec's code."""
import json
import os
import re

_TURN_RE = re.compile(r"<\|im_start\|>(system|user)\n(.*?)<\|im_end\|>\n", re.S)


def fixture_messages(prompt):
    """The system + user messages behind a rendered prompt (the ``/think`` switch taken off the user turn)."""
    turns = [{"role": role, "content": content} for role, content in _TURN_RE.findall(prompt)]
    assert [t["role"] for t in turns] == ["system", "user"] and turns[-1]["content"].endswith("/think")
    turns[-1]["content"] = turns[-1]["content"][:-len("/think")]
    return turns


def recif_rows(samples):
    """RecIF task rows (``messages`` / ``metadata`` JSON strings, content as text parts) from fixture samples."""
    rows = []
    for s in samples:
        messages = []
        for m in fixture_messages(s["prompt"]):
            half = len(m["content"]) // 2  # two text parts, which the loader must join
            messages.append({"role": m["role"], "content": [{"type": "text", "text": m["content"][:half]},
                                                            {"type": "text", "text": m["content"][half:]}]})
        meta = {"answer": s["ground_truth"], "uid": s["metadata"]["uid"], "answer_pid": s["metadata"]["answer_pid"]}
        rows.append({"messages": json.dumps(messages, ensure_ascii=False),
                     "metadata": json.dumps(meta, ensure_ascii=False)})
    return rows


def write_recif_task(root, name, rows, fmt="parquet"):
    """``root/name/name_test.{parquet,jsonl}``; returns the task folder."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}_test.{fmt}")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return folder
