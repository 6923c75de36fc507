"""`medgpt.data.stats`: counts of read, kept, blank and dropped records (with example locations per reason) merged
across sources and written as data_stats.json."""

import json

from medgpt.data.stats import DataStats, write_stats


def test_stats_merge_and_write(tmp_path):
    a, b = DataStats(read=5), DataStats(read=3, blank=1)
    for i in range(4):
        a.drop("missing field", f"a:{i}")
    b.drop("missing field", "b:1")
    b.drop("invalid JSON", "b:2")
    merged = a.merge(b)
    assert (merged.read, merged.kept, merged.blank) == (8, 2, 1)
    assert merged.dropped == {"missing field": 5, "invalid JSON": 1}
    assert merged.examples["missing field"] == ["a:0", "a:1", "a:2", "a:3", "b:1"]
    stats = DataStats(read=4)
    stats.drop("invalid JSON", "x:1")
    assert json.loads(stats.write(tmp_path).read_text())["kept"] == 3
    path = write_stats(tmp_path, {"train": stats, "eval": DataStats(read=1)})
    assert json.loads(path.read_text())["eval"]["kept"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["data_stats.json"]  # no temporary file left
