"""Dataset files: every malformed file or entry gives its error or its reject, nothing silently dropped."""

import json

import pytest

from fastllava.data.files import RejectLog, load_records, validate_entry


def good(i, image=True):
    entry = {"id": f"s{i}", "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + "What is this?"},
        {"from": "gpt", "value": "A cat."}]}
    if image:
        entry["image"] = f"img{i}.jpg"
    return entry


def turns(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


BAD = {
    "type": [
        ["not", "an", "object"],
        {"id": ["x"], "conversations": turns(("human", "q"), ("gpt", "a"))},
        {"id": "x", "image": 3, "conversations": turns(("human", "<image>q"), ("gpt", "a"))},
        {"id": "x", "image": [], "conversations": turns(("human", "q"), ("gpt", "a"))},
        {"id": "x", "conversations": []},
        {"id": "x", "conversations": turns(("human", "q"), ("gpt", 7))},
    ],
    "missing_key": [
        {"conversations": turns(("human", "q"), ("gpt", "a"))},
        {"id": "x"},
        {"id": "x", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
    ],
    "role": [{"id": "x", "conversations": turns(("human", "q"), ("assistant", "a"))}],
    "roles": [
        {"id": "x", "conversations": turns(("gpt", "a"), ("human", "q"))},
        {"id": "x", "conversations": turns(("human", "q"), ("human", "q2"))},
        {"id": "x", "conversations": turns(("human", "q"), ("gpt", "a"), ("human", "q2"))},
    ],
    "empty_turn": [{"id": "x", "conversations": turns(("human", "q"), ("gpt", "  \n"))}],
    "image_tags": [
        {"id": "x", "conversations": turns(("human", "<image>\nq"), ("gpt", "a"))},
        {"id": "x", "image": "a.jpg", "conversations": turns(("human", "q"), ("gpt", "a"))},
        {"id": "x", "image": ["a.jpg"], "conversations": turns(("human", "<image><image>q"), ("gpt", "a"))},
        {"id": "x", "image": "a.jpg", "conversations": turns(("human", "q"), ("gpt", "<image> a"))},
    ],
}


@pytest.mark.parametrize("reason,entry", [(r, e) for r, es in BAD.items() for e in es])
def test_each_bad_entry_is_rejected_with_its_reason(tmp_path, reason, entry):
    data = [good(0), entry, good(2, image=False)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    log = RejectLog(tmp_path / "rejects.jsonl")
    records = load_records(path, rejects=log, verbose=False)
    assert len(records) == 2 and records.ids == ["s0", "s2"]
    assert dict(log.counts) == {reason: 1}
    assert records.summary.rejects == {reason: 1}
    (line,) = (tmp_path / "rejects.jsonl").read_text().splitlines()
    rec = json.loads(line)
    assert rec["file"] == str(path) and rec["index"] == 1 and rec["reason"] == reason and rec["detail"]
    expected_id = entry.get("id") if isinstance(entry, dict) and isinstance(entry.get("id"), str) else None
    assert rec["id"] == expected_id
    with pytest.raises(ValueError, match=rf"d\.json entry 1.*{reason}"):
        load_records(path, rejects=RejectLog(strict=True), verbose=False)


def test_valid_entries_round_trip_and_summary(tmp_path, capsys):
    multi = {"id": 5, "image": ["a.jpg", "b.jpg"],
             "conversations": turns(("human", "<image> left, <image> right: same?"), ("gpt", "No."))}
    data = [good(0), good(1, image=False), multi]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    records = load_records(path)
    assert [records[i] for i in range(3)] == data
    assert records.ids == ["s0", "s1", "5"]
    assert records.num_images.tolist() == [1, 0, 2] and records.has_image.tolist() == [True, False, True]
    assert records.source(2) == (str(path), 2, None)
    s = records.summary
    assert (s.samples, s.images, s.text_only, sum(s.rejects.values())) == (3, 3, 1, 0)
    assert "3 samples" in capsys.readouterr().err


def test_malformed_json_list_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 3"):
        load_records(path, verbose=False)


def test_jsonl_lines_errors_and_unicode_separators(tmp_path):
    entry = good(0)
    entry["conversations"][1]["value"] = "line\u2028separator and \u0085 next-line are not line breaks"
    bad = {"id": "b", "conversations": turns(("gpt", "a"), ("human", "q"))}
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(entry, ensure_ascii=False), "", json.dumps(bad), json.dumps(good(3))]
    path.write_text("\n".join(lines) + "\n")
    log = RejectLog(tmp_path / "r.jsonl")
    records = load_records(path, rejects=log, verbose=False)
    assert records.ids == ["s0", "s3"] and records[0] == entry
    assert records.source(1) == (str(path), 2, 4)
    (rec,) = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert (rec["index"], rec["line"], rec["id"], rec["reason"]) == (1, 3, "b", "roles")
    path.write_text(json.dumps(good(0)) + "\n" + '{"id": "x", "conversations": [}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl: malformed JSON on line 2"):
        load_records(path, verbose=False)


def test_image_existence_check_is_optional(tmp_path):
    (tmp_path / "img0.jpg").write_bytes(b"x")
    path = tmp_path / "d.json"
    path.write_text(json.dumps([good(0), good(1)]))
    assert len(load_records(path, verbose=False)) == 2  # lazy by default
    log = RejectLog()
    records = load_records(path, rejects=log, image_folder=tmp_path, check_images=True, verbose=False)
    assert records.ids == ["s0"] and dict(log.counts) == {"missing_image": 1}
    assert "img1.jpg" in log.examples[0].detail
    with pytest.raises(ValueError, match="image_folder"):
        load_records(path, check_images=True, verbose=False)


def test_several_files_and_missing_file(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text(json.dumps([good(0)]))
    b.write_text(json.dumps(good(1)) + "\n")
    records = load_records([a, b], verbose=False)
    assert records.ids == ["s0", "s1"] and records.source(1) == (str(b), 0, 1)
    with pytest.raises(ValueError, match="does not exist"):
        load_records(tmp_path / "nope.json", verbose=False)


def test_reject_log_starts_fresh_and_records_each_sample_once(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("old run\n")
    log = RejectLog(path)
    assert not path.exists()
    from fastllava.data.files import Reject

    r = Reject("f.json", 3, "x", "image", "broken")
    log.add(r)
    log.add(r)
    assert log.total == 1 and len(path.read_text().splitlines()) == 1


def test_validate_entry_accepts_image_only_human_turn():
    validate_entry({"id": "p", "image": "a.jpg", "conversations": turns(("human", "<image>\n"), ("gpt", "cap"))})


def test_a_json_list_is_read_in_memory_near_its_size(tmp_path):
    """Entries are decoded one at a time and dropped once validated: reading a list peaks near twice the
    file's size (its text, then the kept buffer); holding every decoded entry, as json.load does and this
    reader did before, peaked at 10x on this file. Every rank of a node reads the file."""
    import tracemalloc

    turns = [{"from": "human", "value": "<image>\nWhat is in the picture on the left side?"},
             {"from": "gpt", "value": "Two cats sit on a red sofa next to a window."}]
    turns += [{"from": "human", "value": "And on the right?"}, {"from": "gpt", "value": "A dog on a blue rug."}] * 2
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": str(i), "image": f"{i}.jpg", "conversations": turns} for i in range(20000)]))
    tracemalloc.start()
    try:
        records = load_records(path, verbose=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(records) == 20000 and records[19999]["conversations"] == turns
    assert peak < 3 * path.stat().st_size, (peak, path.stat().st_size)
