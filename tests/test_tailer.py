"""The tailer alone: files in tmp_path, lines collected from its sink."""

from __future__ import annotations

import os
from pathlib import Path

from exporter.config import LogsConfig
from exporter.tailer import Tailer


class Collect:
    def __init__(self) -> None:
        self.lines: list[bytes | None] = []
        self.numbers: list[int] = []
        self.bytes = 0

    def __call__(self, path: str, lines: list[bytes | None], first: int, nbytes: int) -> None:
        self.lines.extend(lines)
        self.numbers.extend(range(first, first + len(lines)))
        self.bytes += nbytes


def tailer_for(tmp_path: Path, **kw: object) -> Tailer:
    return Tailer(LogsConfig(paths=[str(tmp_path / "logs" / "kling-*.jsonl")], **kw))  # type: ignore[arg-type]


def test_reads_complete_lines_and_holds_a_partial_one(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-2026-11-22.jsonl"
    log.parent.mkdir()
    log.write_bytes(b"one\ntwo\nthr")
    t, got = tailer_for(tmp_path), Collect()
    t.poll(got)
    assert got.lines == [b"one", b"two"]
    with open(log, "ab") as f:
        f.write(b"ee\nfour\n")
    t.poll(got)
    assert got.lines == [b"one", b"two", b"three", b"four"]
    assert got.numbers == [1, 2, 3, 4]
    assert got.bytes == log.stat().st_size


def test_picks_up_new_files_including_ones_with_lines(tmp_path: Path) -> None:
    t, got = tailer_for(tmp_path), Collect()
    t.poll(got)  # the directory does not even exist yet
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "kling-2026-11-23.jsonl").write_bytes(b"a\nb\n")
    (tmp_path / "logs" / "other.txt").write_bytes(b"not ours\n")
    t.poll(got)
    assert got.lines == [b"a", b"b"]
    assert t.watched == 1


def test_overlong_line_is_marked_and_the_next_lines_survive(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-x.jsonl"
    log.parent.mkdir()
    big = b"x" * (3 * 1024 * 1024)
    log.write_bytes(b"before\n" + big + b"\nafter\n")
    t, got = tailer_for(tmp_path, max_line_bytes=4096), Collect()
    t.poll(got)
    assert got.lines == [b"before", None, b"after"]
    assert got.numbers == [1, 2, 3]
    assert got.bytes == log.stat().st_size


def test_overlong_line_written_in_pieces(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-x.jsonl"
    log.parent.mkdir()
    log.write_bytes(b"a\n" + b"y" * 5000)
    t, got = tailer_for(tmp_path, max_line_bytes=4096), Collect()
    t.poll(got)
    with open(log, "ab") as f:
        f.write(b"y" * 5000 + b"\nb\n")
    t.poll(got)
    assert got.lines == [b"a", None, b"b"]


def test_copytruncate_reads_the_file_again_from_the_start(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-x.jsonl"
    log.parent.mkdir()
    log.write_bytes(b"first line\nsecond line\n")
    t, got = tailer_for(tmp_path), Collect()
    t.poll(got)
    with open(log, "r+b") as f:
        f.truncate(0)
    log.write_bytes(b"new 1\n")
    t.poll(got)
    assert got.lines == [b"first line", b"second line", b"new 1"]


def test_copytruncate_then_more_bytes_than_before(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-x.jsonl"
    log.parent.mkdir()
    log.write_bytes(b"aaaa\n")
    t, got = tailer_for(tmp_path), Collect()
    t.poll(got)
    log.write_bytes(b"bbbb\ncccccccc\n")  # truncated and refilled between two looks
    t.poll(got)
    assert got.lines == [b"aaaa", b"bbbb", b"cccccccc"]


def test_rename_rotation_drains_the_old_file_then_reads_the_new(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-x.jsonl"
    log.parent.mkdir()
    log.write_bytes(b"1\n")
    t, got = tailer_for(tmp_path, rotate_wait="0s"), Collect()
    t.poll(got)
    with open(log, "ab") as writer:
        os.rename(log, tmp_path / "logs" / "kling-x.jsonl.1")
        writer.write(b"2\n")  # the writer still has the old handle
    log.write_bytes(b"3\n")
    t.poll(got)
    assert got.lines == [b"1", b"2", b"3"]
    assert t.watched == 1


def test_rename_within_the_glob_keeps_the_position(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-a.jsonl"
    log.parent.mkdir()
    log.write_bytes(b"1\n")
    t, got = tailer_for(tmp_path), Collect()
    t.poll(got)
    os.rename(log, tmp_path / "logs" / "kling-b.jsonl")
    with open(tmp_path / "logs" / "kling-b.jsonl", "ab") as f:
        f.write(b"2\n")
    t.poll(got)
    assert got.lines == [b"1", b"2"]


def test_start_at_end_skips_existing_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kling-x.jsonl"
    log.parent.mkdir()
    log.write_bytes(b"old\nhalf")
    t, got = tailer_for(tmp_path, start_at="end"), Collect()
    t.poll(got)
    assert got.lines == []
    with open(log, "ab") as f:
        f.write(b" done\nnew\n")
    (tmp_path / "logs" / "kling-y.jsonl").write_bytes(b"later file\n")
    t.poll(got)
    assert got.lines == [b"half done", b"new", b"later file"]


def test_saved_positions_resume_and_a_replaced_file_starts_over(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "kling-a.jsonl").write_bytes(b"a1\n")
    (logs / "kling-b.jsonl").write_bytes(b"b1\n")
    t, got = tailer_for(tmp_path), Collect()
    t.poll(got)
    saved = t.to_state()
    t.close()
    with open(logs / "kling-a.jsonl", "ab") as f:
        f.write(b"a2\n")
    (logs / "kling-b.jsonl").unlink()
    (logs / "kling-b.jsonl").write_bytes(b"B1\n")  # may reuse the inode; content differs
    t2, got2 = Tailer(t.config, saved), Collect()
    t2.poll(got2)
    assert sorted(got2.lines) == [b"B1", b"a2"]  # type: ignore[type-var]
