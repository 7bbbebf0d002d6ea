"""Listing inputs on the driver: what real archives hold (loops, links, odd names, FIFOs) must not hang or fail it."""

from __future__ import annotations

import os
import sys

import pyarrow.fs as pafs
import pytest

from stfpm_ray.data import listing
from stfpm_ray.data.listing import Listing, list_images
from stfpm_ray.data.mvtec import is_mask
from stfpm_ray.errors import InputNotFoundError
from stfpm_ray.store.fs import register_filesystem

pytestmark = pytest.mark.timeout(30)  # a walk that follows a loop or opens a FIFO would otherwise hang
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="symlinks, FIFOs and bytes names are POSIX")


def _touch(path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _rows(found: Listing) -> dict[str, tuple[int, int, str | None]]:
    table = found.files
    assert table.column_names == ["path", "source", "size", "error"]
    return {p: (s, n, e) for p, s, n, e in zip(*(table[c].to_pylist() for c in table.column_names))}


def _paths(found: Listing) -> list[str]:
    return found.files["path"].to_pylist()


@posix_only
def test_directory_symlink_loops_finish_with_one_row_per_real_file(tmp_path):
    _touch(tmp_path / "a.png", b"aa")
    _touch(tmp_path / "sub" / "b.PNG", b"bbb")
    (tmp_path / "loop").symlink_to(".")
    (tmp_path / "again").symlink_to(".")
    (tmp_path / "sub" / "loop").symlink_to("..")
    found = list_images([str(tmp_path)])
    assert _rows(found) == {str(tmp_path / "a.png"): (0, 2, None), str(tmp_path / "sub" / "b.PNG"): (0, 3, None)}
    assert found.skipped == {listing.SKIPPED_DIR_SYMLINKS: 3}
    assert len(found.sources) == 1 and isinstance(found.sources[0][0], pafs.LocalFileSystem)
    assert found.sources[0][1] == ""


@posix_only
def test_a_file_reached_through_a_symlink_is_listed_once_under_its_real_name(tmp_path):
    _touch(tmp_path / "z_real.png")
    (tmp_path / "a_link.png").symlink_to("z_real.png")
    os.link(tmp_path / "z_real.png", tmp_path / "y_hard.png")
    # a hard link is a name of its own (archives keep one image under two names on purpose): both stay
    assert _paths(list_images([str(tmp_path)])) == [str(tmp_path / "y_hard.png"), str(tmp_path / "z_real.png")]
    os.unlink(tmp_path / "y_hard.png")
    assert _paths(list_images([str(tmp_path)])) == [str(tmp_path / "z_real.png")]


@posix_only
def test_a_symlink_to_a_file_outside_the_tree_is_followed(tmp_path):
    _touch(tmp_path / "elsewhere" / "img.jpg", b"12345")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "img.jpg").symlink_to(tmp_path / "elsewhere" / "img.jpg")
    assert _rows(list_images([str(tmp_path / "in")])) == {str(tmp_path / "in" / "img.jpg"): (0, 5, None)}


@posix_only
def test_a_dangling_symlink_becomes_an_error_row(tmp_path):
    _touch(tmp_path / "ok.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")  # not an image: no row at all
    rows = _rows(list_images([str(tmp_path)]))
    assert rows == {
        str(tmp_path / "gone.png"): (0, 0, f"dangling symbolic link (target: {tmp_path / 'missing.png'})"),
        str(tmp_path / "ok.png"): (0, 1, None),
    }


@posix_only
def test_a_name_that_is_not_utf8_is_one_escaped_error_row(tmp_path):
    _touch(tmp_path / "a.png")
    _touch(tmp_path / "z.png")
    bad = os.path.join(os.fsencode(tmp_path), b"img_\xff.png")
    try:
        os.close(os.open(bad, os.O_CREAT | os.O_WRONLY, 0o644))
    except OSError as exc:  # some filesystems (and macOS) refuse such names outright
        pytest.skip(f"this filesystem refuses non-UTF-8 names: {exc}")
    rows = _rows(list_images([str(tmp_path)]))
    assert rows == {
        str(tmp_path / "a.png"): (0, 1, None),
        f"{tmp_path}/img_\\xff.png": (0, 0, listing.NOT_UTF8_FILE),
        str(tmp_path / "z.png"): (0, 1, None),
    }


@posix_only
def test_a_folder_name_that_is_not_utf8_gives_error_rows_for_its_images(tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"bad_\xe9")
    try:
        os.mkdir(folder)
    except OSError as exc:
        pytest.skip(f"this filesystem refuses non-UTF-8 names: {exc}")
    os.close(os.open(os.path.join(folder, b"x.png"), os.O_CREAT | os.O_WRONLY, 0o644))
    assert _rows(list_images([str(tmp_path)])) == {f"{tmp_path}/bad_\\xe9/x.png": (0, 0, listing.NOT_UTF8_FOLDER)}


@posix_only
@pytest.mark.timeout(30)
def test_a_fifo_is_skipped_and_counted_never_opened(tmp_path):
    _touch(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "pipe.txt")  # not an image name: not even counted
    (tmp_path / "to_pipe.png").symlink_to("pipe.png")
    found = list_images([str(tmp_path)])
    assert _paths(found) == [str(tmp_path / "a.png")]
    assert found.skipped == {listing.SKIPPED_SPECIAL: 2}
    named = list_images([str(tmp_path / "pipe.png")])  # even named directly, a FIFO is not opened
    assert named.files.num_rows == 0 and named.skipped == {listing.SKIPPED_SPECIAL: 1}


def test_an_unreadable_subfolder_is_counted_not_fatal(tmp_path, monkeypatch):
    _touch(tmp_path / "a.png")
    _touch(tmp_path / "locked" / "b.png")
    locked, scandir = os.fsencode(tmp_path / "locked"), os.scandir

    def refusing(path):  # chmod 0 would not stop root, who runs these tests in CI containers
        if path == locked:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(listing.os, "scandir", refusing)
    found = list_images([str(tmp_path)])
    assert _paths(found) == [str(tmp_path / "a.png")]
    assert found.skipped == {listing.SKIPPED_UNREADABLE: 1}


def test_hidden_entries_masks_and_other_extensions_are_skipped_in_folders(tmp_path):
    root = tmp_path / ".archive"  # a hidden input itself is listed: only entries below it are hidden
    for name in (
        "bottle/test/good/000.png",
        "bottle/test/broken/001.JPEG",
        "bottle/test/good/.002.png",
        ".cache/003.png",
        "bottle/ground_truth/broken/001_mask.png",
        "bottle/notes.txt",
        "bottle/x.tiff",
        "bottle/y.Bmp",
    ):
        _touch(root / name)
    assert _paths(list_images([str(root)])) == [
        str(root / "bottle/test/broken/001.JPEG"),
        str(root / "bottle/test/good/000.png"),
        str(root / "bottle/x.tiff"),
        str(root / "bottle/y.Bmp"),
    ]
    assert is_mask("bottle/ground_truth/broken/001_mask.png")
    assert not is_mask("bottle/test/broken/001.png")


def test_a_file_input_is_taken_whatever_its_extension_and_inputs_keep_their_source(tmp_path):
    _touch(tmp_path / "scan.raw", b"abcd")
    _touch(tmp_path / "folder" / "a.png")
    found = list_images([str(tmp_path / "folder"), str(tmp_path / "scan.raw"), str(tmp_path / "folder" / "a.png")])
    assert _rows(found) == {str(tmp_path / "folder" / "a.png"): (0, 1, None), str(tmp_path / "scan.raw"): (1, 4, None)}
    assert len(found.sources) == 3


def test_a_missing_input_raises(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        list_images([str(tmp_path / "nowhere")])


@posix_only
def test_a_dangling_symlink_as_input_raises(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputNotFoundError, match="dangling"):
        list_images([str(tmp_path / "link")])


def test_an_empty_folder_lists_nothing(tmp_path):
    found = list_images([str(tmp_path)])
    assert found.files.num_rows == 0 and found.files.column_names == ["path", "source", "size", "error"]
    assert found.skipped == {}


def test_many_files_are_built_in_chunks_sorted_and_unique(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "CHUNK_ROWS", 7)
    names = [f"{i:03d}.png" for i in range(40)]
    for name in reversed(names):
        _touch(tmp_path / "d" / name)
    found = list_images([str(tmp_path / "d"), str(tmp_path / "d")])
    assert _paths(found) == [str(tmp_path / "d" / name) for name in names]
    assert set(found.files["source"].to_pylist()) == {0}  # the first input that named a file keeps it


def test_a_pyarrow_filesystem_keeps_the_recursive_listing(tmp_path):
    for name in (
        "bottle/test/good/000.png",
        "bottle/test/good/.001.png",
        "bottle/ground_truth/b/000_mask.png",
        "bottle/test/b/002.jpg",
        "bottle/readme.md",
    ):
        _touch(tmp_path / name, b"xyz")
    filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    register_filesystem("listing-test", filesystem)
    found = list_images(["listing-test://bottle", "listing-test://bottle/readme.md"])
    assert _rows(found) == {
        "listing-test://bottle/readme.md": (1, 3, None),
        "listing-test://bottle/test/b/002.jpg": (0, 3, None),
        "listing-test://bottle/test/good/000.png": (0, 3, None),
    }
    assert found.sources == [(filesystem, "listing-test://"), (filesystem, "listing-test://")]
    with pytest.raises(InputNotFoundError):
        list_images(["listing-test://bottle/nowhere"])
