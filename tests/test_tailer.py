"""The tailer alone: files in tmp_path, lines collected from its sink."""

from __future__ import annotations

import errno
import glob
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from kling_exporter.config import LogsConfig
from kling_exporter.reading.listing import ListingError, expand_glob
from kling_exporter.reading.tailer import Tailer


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


def started(tmp_path: Path, name: str, first: bytes, **kw: Any) -> tuple[Path, Tailer, Collect]:
    """A log ``name`` holding ``first``, and a tailer that has read it once."""
    log = tmp_path / "logs" / name
    log.parent.mkdir(exist_ok=True)
    log.write_bytes(first)
    t, got = tailer_for(tmp_path, **kw), Collect()
    t.poll(got)
    return log, t, got


def test_reads_complete_lines_and_holds_a_partial_one(tmp_path: Path) -> None:
    log, t, got = started(tmp_path, "kling-2026-11-22.jsonl", b"one\ntwo\nthr")
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
    log, t, got = started(tmp_path, "kling-x.jsonl", b"a\n" + b"y" * 5000, max_line_bytes=4096)
    with open(log, "ab") as f:
        f.write(b"y" * 5000 + b"\nb\n")
    t.poll(got)
    assert got.lines == [b"a", None, b"b"]


def test_copytruncate_reads_the_file_again_from_the_start(tmp_path: Path) -> None:
    log, t, got = started(tmp_path, "kling-x.jsonl", b"first line\nsecond line\n")
    with open(log, "r+b") as f:
        f.truncate(0)
    log.write_bytes(b"new 1\n")
    t.poll(got)
    assert got.lines == [b"first line", b"second line", b"new 1"]


def test_copytruncate_then_more_bytes_than_before(tmp_path: Path) -> None:
    log, t, got = started(tmp_path, "kling-x.jsonl", b"aaaa\n")
    log.write_bytes(b"bbbb\ncccccccc\n")  # truncated and refilled between two looks
    t.poll(got)
    assert got.lines == [b"aaaa", b"bbbb", b"cccccccc"]


def test_rename_rotation_drains_the_old_file_then_reads_the_new(tmp_path: Path) -> None:
    log, t, got = started(tmp_path, "kling-x.jsonl", b"1\n", rotate_wait="0s")
    with open(log, "ab") as writer:
        os.rename(log, tmp_path / "logs" / "kling-x.jsonl.1")
        writer.write(b"2\n")  # the writer still has the old handle
    log.write_bytes(b"3\n")
    t.poll(got)
    assert got.lines == [b"1", b"2", b"3"]
    assert t.watched == 1


def test_rename_within_the_glob_keeps_the_position(tmp_path: Path) -> None:
    log, t, got = started(tmp_path, "kling-a.jsonl", b"1\n")
    os.rename(log, tmp_path / "logs" / "kling-b.jsonl")
    with open(tmp_path / "logs" / "kling-b.jsonl", "ab") as f:
        f.write(b"2\n")
    t.poll(got)
    assert got.lines == [b"1", b"2"]


def test_start_at_end_skips_existing_lines_only(tmp_path: Path) -> None:
    log, t, got = started(tmp_path, "kling-x.jsonl", b"old\nhalf", start_at="end")
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


def lines_of(prefix: str, n: int, start: int = 0) -> bytes:
    """n distinct lines, each long enough for copies to be told by their first bytes."""
    return b"".join(
        f'{{"task_id": "{prefix}-{i:06d}", "note": "{"x" * 60}"}}\n'.encode()
        for i in range(start, start + n)
    )


def test_a_listing_error_is_not_taken_for_files_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, t, got = started(tmp_path, "kling-x.jsonl", lines_of("a", 3), rotate_wait="0s")
    real = os.scandir

    def no_descriptors(path: str) -> object:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "scandir", no_descriptors)
    for _ in range(3):
        t.poll(got)
    monkeypatch.setattr(os, "scandir", real)
    with open(log, "ab") as f:
        f.write(lines_of("a", 2, start=3))
    t.poll(got)
    assert len(got.lines) == 5
    assert len(set(got.lines)) == 5


def test_idle_files_are_closed_and_read_on_from_their_offset(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for day in range(5):
        (logs / f"kling-{day}.jsonl").write_bytes(lines_of(str(day), 2))
    t, got = tailer_for(tmp_path, idle_close="0s"), Collect()
    t.poll(got)
    assert t.open_files == 0 and len(got.lines) == 10
    with open(logs / "kling-4.jsonl", "ab") as f:
        f.write(lines_of("4", 1, start=2))
    t.poll(got)
    t.poll(got)
    assert len(got.lines) == 11 and len(set(got.lines)) == 11


def test_at_most_max_open_files_are_held(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for day in range(20):
        (logs / f"kling-{day:02d}.jsonl").write_bytes(lines_of(str(day), 1))
    t, got = tailer_for(tmp_path), Collect()
    t.max_open = 4
    t.poll(got)
    assert t.open_files <= 4 and len(got.lines) == 20


def test_a_directory_moved_away_and_back_is_not_read_again(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "kling-x.jsonl").write_bytes(lines_of("a", 4))
    t, got = tailer_for(tmp_path, rotate_wait="0s"), Collect()
    t.poll(got)
    os.rename(logs, tmp_path / "elsewhere")
    t.poll(got)
    t.poll(got)  # gone past rotate_wait: let go
    os.rename(tmp_path / "elsewhere", logs)
    with open(logs / "kling-x.jsonl", "ab") as f:
        f.write(lines_of("a", 1, start=4))
    t.poll(got)
    assert len(got.lines) == 5 and len(set(got.lines)) == 5


def copytruncate(log: Path, copy: Path) -> None:
    shutil.copyfile(log, copy)
    with open(log, "r+b") as f:
        f.truncate(0)


@pytest.mark.parametrize("glob_matches_copies", [False, True])
@pytest.mark.parametrize("look_between", [False, True])
def test_copytruncate_reads_the_lines_only_in_the_copy_once(
    tmp_path: Path, glob_matches_copies: bool, look_between: bool
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "kling.jsonl"
    pattern = "kling.jsonl*" if glob_matches_copies else "kling.jsonl"
    t, got = Tailer(LogsConfig(paths=[str(logs / pattern)], rotate_wait="0s")), Collect()
    log.write_bytes(lines_of("a", 5))
    t.poll(got)
    with open(log, "ab") as f:
        f.write(lines_of("a", 3, start=5))  # written after the last look: only in the copy
    shutil.copyfile(log, logs / "kling.jsonl.1")
    if look_between:
        t.poll(got)  # the copy is there, the truncation not yet
    with open(log, "r+b") as f:
        f.truncate(0)
    with open(log, "ab") as f:
        f.write(lines_of("b", 2))
    t.poll(got)
    t.poll(got)
    assert len(got.lines) == 10, got.lines
    assert len(set(got.lines)) == 10


def test_copytruncate_across_a_restart_continues_from_the_copy(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "kling.jsonl"
    config = LogsConfig(paths=[str(logs / "kling.jsonl*")], rotate_wait="0s")
    t, got = Tailer(config), Collect()
    log.write_bytes(lines_of("a", 5))
    t.poll(got)
    saved = t.to_state()
    t.close()
    with open(log, "ab") as f:
        f.write(lines_of("a", 2, start=5))
    copytruncate(log, logs / "kling.jsonl.1")
    log.write_bytes(lines_of("b", 1))
    t2 = Tailer(config, saved)
    t2.poll(got)
    t2.poll(got)
    assert len(got.lines) == 8 and len(set(got.lines)) == 8


def test_a_backup_copy_under_the_globs_is_not_read_twice(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    t, got = tailer_for(tmp_path), Collect()
    (logs / "kling-a.jsonl").write_bytes(lines_of("a", 3))
    t.poll(got)
    shutil.copyfile(logs / "kling-a.jsonl", logs / "kling-a-backup.jsonl")
    t.poll(got)
    assert len(got.lines) == 3


@pytest.mark.parametrize("follow", [False, True])
def test_symlinks_out_of_the_log_folder(tmp_path: Path, follow: bool) -> None:
    logs = tmp_path / "logs"
    (logs / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.jsonl"
    outside.write_bytes(b"outside\n")
    (logs / "sub" / "real.jsonl").write_bytes(b"inside\n")
    (logs / "kling-out.jsonl").symlink_to(outside)
    (logs / "kling-in.jsonl").symlink_to(logs / "sub" / "real.jsonl")
    t, got = tailer_for(tmp_path, follow_symlinks=follow), Collect()
    t.poll(got)
    assert sorted(got.lines) == ([b"inside", b"outside"] if follow else [b"inside"])  # type: ignore[type-var]


def test_expand_glob_matches_like_glob(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jsonl", "a/b/y.jsonl", "a/.hidden.jsonl", "a/b/z.txt"):
        (tmp_path / name).write_text("")
    for pattern in ("a/*.jsonl", "a/**/*.jsonl", "*/b/*", "a/?.jsonl", "a/.*"):
        full = str(tmp_path / pattern)
        assert sorted(expand_glob(full)) == sorted(glob.glob(full, recursive=True)), pattern


def test_expand_glob_raises_instead_of_answering_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "logs").mkdir()

    def denied(path: str) -> object:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(ListingError):
        expand_glob(str(tmp_path / "logs" / "*.jsonl"))
    assert expand_glob(str(tmp_path / "missing" / "x.jsonl")) == []


def test_an_idle_closed_file_rotated_away_is_still_drained(tmp_path: Path) -> None:
    log, t, got = started(tmp_path, "kling-x.jsonl", b"1\n", idle_close="0s", rotate_wait="0s")
    assert t.open_files == 0
    with open(log, "ab") as writer:
        os.rename(log, tmp_path / "logs" / "kling-x.jsonl.1")
        writer.write(b"2\n")  # the writer still has the old handle
    log.write_bytes(b"3\n")
    t.poll(got)
    assert got.lines == [b"1", b"2", b"3"]


def following_copies(
    tmp_path: Path, pattern: str = "kling.jsonl*", **kw: Any
) -> tuple[Path, Tailer, Collect]:
    """The file logs/kling.jsonl and a tailer whose globs match its copies."""
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    config = LogsConfig(paths=[str(logs / pattern)], rotate_wait="0s", **kw)
    return logs / "kling.jsonl", Tailer(config), Collect()


def restarted(t: Tailer) -> Tailer:
    """The tailer of the daemon started again: what it saved, nothing else."""
    saved = t.to_state()
    t.close()
    return Tailer(t.config, saved)


def rewrite(path: Path, data: bytes) -> None:
    """The same inode, other bytes."""
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def assert_each_once(t: Tailer, got: Collect, count: int) -> None:
    t.poll(got)
    t.poll(got)
    assert len(got.lines) == count, got.lines
    assert len(set(got.lines)) == count


@pytest.mark.parametrize("copied", [0, 40, 100, 300])
def test_a_copy_seen_while_it_is_being_written_is_not_read_again(
    tmp_path: Path, copied: int
) -> None:
    """The watcher can report a copytruncate's copy as soon as it is created: empty, or
    holding fewer first bytes than the file it copies is known by."""
    log, t, got = following_copies(tmp_path)
    copy = log.with_name("kling.jsonl.1")
    log.write_bytes(lines_of("a", 5))
    t.poll(got)
    append(log, lines_of("a", 2, start=5))  # written after the last look: only in the copy
    copy.write_bytes(log.read_bytes()[:copied])
    t.poll(got)
    t.poll(got)
    copytruncate(log, copy)
    append(log, lines_of("b", 2))
    assert_each_once(t, got, 9)


@pytest.mark.parametrize(
    "magic", [b"\x1f\x8b\x08\x00", b"\xfd7zXZ\x00", b"(\xb5/\xfd", b"BZh9"], ids=str
)
def test_compressed_files_under_the_globs_are_not_read_as_lines(
    tmp_path: Path, magic: bytes
) -> None:
    log, t, got = following_copies(tmp_path)
    packed = log.with_name("kling.jsonl.2.gz")
    log.write_bytes(lines_of("a", 2))
    packed.write_bytes(magic)  # compression under way
    t.poll(got)
    append(packed, os.urandom(2000).replace(b"\n", b"") + b"\n" + os.urandom(100) + b"\n")
    assert_each_once(t, got, 2)


@pytest.mark.parametrize(("idle", "restart"), [(False, False), (True, False), (False, True)])
def test_a_copy_in_the_inode_of_a_file_deleted_is_not_read_again(
    tmp_path: Path, idle: bool, restart: bool
) -> None:
    """logrotate deletes the oldest copy and then makes the new one, which may get the
    inode just freed: a known file "changed" to a copy of a stream already read. With a
    restart, the file was gone before it and the rotation happens while down."""
    log, t, got = following_copies(tmp_path, idle_close="0s" if idle else "5m")
    oldest, away = log.with_name("kling.jsonl.3"), tmp_path / "away"
    oldest.write_bytes(lines_of("z", 2))
    log.write_bytes(lines_of("a", 5))
    t.poll(got)
    if restart:
        os.rename(oldest, away)
        t.poll(got)
        t.poll(got)  # gone past rotate_wait: let go, remembered
        t = restarted(t)
        os.rename(away, oldest)
    append(log, lines_of("a", 2, start=5))  # written after the last look: only in the copy
    rewrite(oldest, log.read_bytes())
    os.rename(oldest, log.with_name("kling.jsonl.1"))
    rewrite(log, lines_of("b", 2))
    assert_each_once(t, got, 11)


def test_a_copy_in_the_inode_of_a_compressed_file_deleted_is_read(tmp_path: Path) -> None:
    """logrotate's compress and delaycompress: the oldest copy, compressed, is deleted
    and the new copy may get its inode. The file known by that inode as compressed (never
    read) is a copy of lines now, and the lines only in it are read (they were lost: the
    inode stayed marked compressed)."""
    log, t, got = following_copies(tmp_path)
    oldest = log.with_name("kling.jsonl.3.gz")
    oldest.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(200))
    log.write_bytes(lines_of("a", 5))
    t.poll(got)
    append(log, lines_of("a", 2, start=5))  # written after the last look: only in the copy
    rewrite(oldest, log.read_bytes())
    os.rename(oldest, log.with_name("kling.jsonl.1"))
    rewrite(log, lines_of("b", 2))
    assert_each_once(t, got, 9)


@pytest.mark.parametrize("restart", [False, True])
def test_a_copy_of_a_file_of_one_short_line_is_not_read_again(
    tmp_path: Path, restart: bool
) -> None:
    """A usage tracker's lines are short: a file may be rotated holding one line only,
    fewer first bytes than a copy is otherwise told by; a whole line is enough."""
    log, t, got = following_copies(tmp_path)
    log.write_bytes(b'{"task_id": "t1", "credits": 5}\n')
    t.poll(got)
    append(log, b'{"task_id": "t2", "credits": 5}\n')  # only in the copy
    copytruncate(log, log.with_name("kling.jsonl.1"))
    if restart:
        t = restarted(t)
    assert_each_once(t, got, 2)


@pytest.mark.parametrize("truncated", [False, True])
def test_a_copy_named_before_its_file_is_not_read_again_after_a_restart(
    tmp_path: Path, truncated: bool
) -> None:
    """`dateext` with `extension .jsonl` names the copy kling-20261203.jsonl, listed
    before kling.jsonl; after a restart the file is known only by a digest of its first
    bytes until it is opened again."""
    log, t, got = following_copies(tmp_path, "kling*.jsonl")
    log.write_bytes(lines_of("a", 5))
    t.poll(got)
    append(log, lines_of("a", 2, start=5))
    shutil.copyfile(log, log.with_name("kling-20261203.jsonl"))
    if truncated:
        rewrite(log, b"")
    assert_each_once(restarted(t), got, 7)


@pytest.mark.parametrize("lines", [1, 5])
def test_a_file_and_its_copy_first_met_in_the_same_poll_are_read_once(
    tmp_path: Path, lines: int
) -> None:
    """At start-up, or when a file was empty at the last save, the file and a copy made
    since are both new: the copy is judged by the first bytes of the file read before
    it in the same poll."""
    log, t, got = following_copies(tmp_path)
    log.write_bytes(lines_of("a", lines))
    shutil.copyfile(log, log.with_name("kling.jsonl.1"))
    t.poll(got)
    append(log, lines_of("a", 1, start=lines))
    assert_each_once(t, got, lines + 1)


def test_a_copy_half_written_in_a_reused_inode_waits_for_a_whole_line(tmp_path: Path) -> None:
    """A known file's inode reused by a copy still being written is judged before the
    new file it copies is read: with not a whole line in it yet, it is judged later."""
    log, t, got = following_copies(tmp_path)
    oldest, copy = log.with_name("kling.jsonl.3"), log.with_name("kling.jsonl.1")
    oldest.write_bytes(lines_of("z", 2))
    t.poll(got)
    log.write_bytes(lines_of("a", 1))
    rewrite(oldest, log.read_bytes()[:30])  # the same inode, a copy of the new file begun
    os.rename(oldest, copy)
    t.poll(got)
    append(copy, log.read_bytes()[30:])
    rewrite(log, lines_of("b", 1))
    assert_each_once(t, got, 4)


def test_an_empty_file_renamed_away_after_a_restart_is_still_drained(tmp_path: Path) -> None:
    """A file still empty at the save is not judged yet, but it is known: renamed beside
    the globs while the daemon was down, it is found by its inode and read."""
    log, t, got = started(tmp_path, "kling-x.jsonl", b"")
    t = restarted(t)
    log.write_bytes(lines_of("a", 1))
    os.rename(log, log.with_name("kling-x.jsonl.1"))
    assert_each_once(t, got, 1)


def test_a_file_empty_at_the_save_is_read_from_its_start_with_start_at_end(
    tmp_path: Path,
) -> None:
    """``start_at: end`` is for files with no saved position; one saved with nothing
    read has one, at 0: what was written while the daemon was down is read."""
    log, t, got = started(tmp_path, "kling-x.jsonl", b"", start_at="end")
    t = restarted(t)
    log.write_bytes(lines_of("a", 2))
    assert_each_once(t, got, 2)
