"""Webdataset shards (engine/data/shards.py, shard_index.py, shard_names.py, tar_stream.py):
streamed into an index, read back by ranged reads, bad shards refused naming shard and member.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from engine.data.errors import DatasetError
from engine.data.prepared import load_dataset_for_task
from engine.data.shard_index import ShardDataset, open_shards
from engine.data.shard_names import expand_braces, shard_urls
from engine.data.shards import prepare_shards
from engine.errors import ExitCode
from engine.store import storage
from engine.store.storage import RetryPolicy, StorageError
from engine.task.definition import DatasetArgs
from tests.support.datasets import png
from tests.support.engine import checkpoint_bytes, make_task, run_chain
from tests.support.shards import sample, shard_bytes, shard_of

if TYPE_CHECKING:  # a runtime import would bypass pytest's plugin loading (and rewriting)
    from tests.support.s3_server import SeaweedS3

pytest_plugins = ["tests.support.s3_server"]


def write_shards(folder: Path, shards: list[bytes]) -> str:
    """Shards 0000.tar.. in ``folder``; returns their brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, data in enumerate(shards):
        (folder / f"{k:04d}.tar").write_bytes(data)
    return f"{folder}/{{0000..{len(shards) - 1:04d}}}.tar"


def committed(address: str) -> bool:
    return storage.exists(storage.join(address, "manifest.json"))


# -- shard names -------------------------------------------------------------------------


def test_brace_ranges_keep_their_padding_and_lists_expand_in_order() -> None:
    assert expand_braces("s3://b/{0000..0002}.tar") == [
        "s3://b/0000.tar", "s3://b/0001.tar", "s3://b/0002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == [
        "a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("pattern, message", [
    ("x/{0000..0003.tar", "unbalanced"), ("x/{5..1}.tar", "backwards"),
    ("x/{one}.tar", "neither a range"), ("x/{0..999999999}.tar", "more than"),
])
def test_bad_brace_patterns_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        expand_braces(pattern)


def test_a_shard_named_twice_is_refused() -> None:
    with pytest.raises(DatasetError, match="names a/1.tar twice"):
        shard_urls(["a/{0..2}.tar", "a/1.tar"])


# -- preparing: only an index, streamed ---------------------------------------------------


def test_prepare_commits_an_index_whose_ranged_reads_give_each_image(tmp_path: Path) -> None:
    images = [png(24 + k, 16, (k * 40, 0, 0)) for k in range(5)]
    shards = [
        shard_bytes([m for k in range(3) for m in
                     sample(f"{k:06d}", image=images[k], caption=f"cat {k}\n",
                            meta={"score": k})]),
        shard_bytes([m for k in range(3, 5) for m in sample(f"{k:06d}", image=images[k])]),
    ]
    args = DatasetArgs(shards=[write_shards(tmp_path / "shards", shards)])

    manifest = prepare_shards(args, str(tmp_path / "index"))
    data = open_shards(manifest.address, args)

    assert manifest.count == len(data) == 5 and manifest.skipped == []
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "manifest.json", "records.jsonl"]  # no image is copied
    for k in range(5):
        assert data.image_bytes(k) == images[k]
        assert data.size(k) == (24 + k, 16)
    assert data.captions(0) == ["cat 0"]
    first = data.record(0)
    assert first["meta"] == {"score": 0} and first["file"] == "0000.tar/000000.png"
    assert data.record(3)["shard"] == 1
    assert data.content_hash == hashlib.sha256(
        (tmp_path / "index" / "records.jsonl").read_bytes()).hexdigest()


def test_samples_without_image_or_caption_or_utf8_caption_are_skipped_with_reasons(
    tmp_path: Path
) -> None:
    shard = shard_bytes([
        *sample("000000"), *sample("000001", image=b""), *sample("000002", caption=None),
        *sample("000003", caption=b"\xff\xfe bad"), *sample("000004", image=b"not an image"),
    ])
    args = DatasetArgs(shards=[write_shards(tmp_path / "s", [shard])])

    manifest = prepare_shards(args, str(tmp_path / "index"))

    assert manifest.count == 1
    reasons = {s["file"]: s["reason"] for s in manifest.skipped}
    assert reasons["0000.tar/000001"].startswith("no image member")
    assert reasons["0000.tar/000002"] == "no caption member (.txt)"
    assert reasons["0000.tar/000003"] == "caption 000003.txt is not UTF-8"
    assert reasons["0000.tar/000004"].startswith("000004.png: unreadable image")


def test_filters_keep_samples_by_their_json_metadata(tmp_path: Path) -> None:
    shard = shard_bytes([m for k in range(6) for m in
                         sample(f"{k:06d}", meta={"aesthetic": {"score": k}})])
    args = DatasetArgs(shards=[write_shards(tmp_path / "s", [shard])],
                       filters=[{"field": "aesthetic.score", "op": ">=", "value": 4}])

    manifest = prepare_shards(args, str(tmp_path / "index"))

    assert manifest.count == 2
    data = open_shards(manifest.address, args)
    assert [data.record(i)["key"] for i in range(2)] == ["000004", "000005"]
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["filtered_out"] == 4


def test_a_filter_field_missing_in_some_records_follows_missing(tmp_path: Path) -> None:
    shard = shard_bytes([*sample("000000", meta={"score": 5}), *sample("000001", meta={}),
                         *sample("000002")])
    pattern = write_shards(tmp_path / "s", [shard])
    rule = {"field": "score", "op": ">", "value": 1}

    with pytest.raises(DatasetError, match=r"'score' is missing in shard .*0000\.tar member "
                                           r"000001\.json"):
        prepare_shards(DatasetArgs(shards=[pattern], filters=[rule]), str(tmp_path / "a"))
    assert not committed(str(tmp_path / "a"))
    kept = prepare_shards(DatasetArgs(shards=[pattern], filters=[{**rule, "missing": "exclude"}]),
                          str(tmp_path / "b"))
    assert kept.count == 1
    included = prepare_shards(
        DatasetArgs(shards=[pattern], filters=[{**rule, "missing": "include"}]),
        str(tmp_path / "c"))
    assert included.count == 3


def test_a_filter_comparing_text_with_a_number_is_an_error_naming_the_member(
    tmp_path: Path
) -> None:
    shard = shard_bytes([*sample("000000", meta={"score": "high"})])
    args = DatasetArgs(shards=[write_shards(tmp_path / "s", [shard])],
                       filters=[{"field": "score", "op": ">", "value": 4.5}])
    with pytest.raises(DatasetError, match=r"member 000000\.json has score='high' \(string\)"):
        prepare_shards(args, str(tmp_path / "index"))


# -- bad shards: an error naming shard and member, nothing committed ----------------------


def test_a_shard_truncated_mid_member_is_refused_naming_shard_and_member(tmp_path: Path) -> None:
    whole = shard_of(range(4))
    cut = whole.index(b"000002.png") + 512 + 40  # inside member 000002.png's data
    args = DatasetArgs(shards=[write_shards(tmp_path / "s", [shard_of(range(2)), whole[:cut]])])

    with pytest.raises(DatasetError, match=r"shard .*0001\.tar is truncated inside member "
                                           r"000002\.png"):
        prepare_shards(args, str(tmp_path / "index"))
    assert not committed(str(tmp_path / "index"))


def test_a_shard_cut_between_members_is_refused_too(tmp_path: Path) -> None:
    whole = shard_of(range(4))
    cut = whole.index(b"000002.png")  # exactly at a header: tarfile would stop quietly
    args = DatasetArgs(shards=[write_shards(tmp_path / "s", [whole[:cut]])])

    with pytest.raises(DatasetError, match=r"0000\.tar is truncated after member 000001\.txt"):
        prepare_shards(args, str(tmp_path / "index"))


def test_a_missing_shard_is_a_dataset_error(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path / "s", [shard_of(range(2))])
    args = DatasetArgs(shards=[pattern.replace("0000..0000", "0000..0001")])
    with pytest.raises(DatasetError, match=r"shard .*0001\.tar not found"):
        prepare_shards(args, str(tmp_path / "index"))


def test_a_shard_changed_after_indexing_is_refused_when_read(tmp_path: Path) -> None:
    args = DatasetArgs(shards=[write_shards(tmp_path / "s", [shard_of(range(2))])])
    data = open_shards(prepare_shards(args, str(tmp_path / "index")).address, args)
    (tmp_path / "s" / "0000.tar").write_bytes(shard_of(range(2), image=png(30, 30)))

    with pytest.raises(DatasetError, match=r"member 000000\.png: not what was indexed"):
        data.image(0)


def test_preparing_again_finds_the_committed_index(tmp_path: Path) -> None:
    args = DatasetArgs(shards=[write_shards(tmp_path / "s", [shard_of(range(2))])])
    first = prepare_shards(args, str(tmp_path / "index"))
    (tmp_path / "s" / "0000.tar").unlink()  # not read again

    assert prepare_shards(args, str(tmp_path / "index")) == first


def test_an_unreachable_shard_is_a_storage_error_exit_4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setattr(storage, "DEFAULT_RETRY", RetryPolicy(attempts=2, initial_delay_s=0))
    storage.clear_filesystem_cache()
    try:
        with pytest.raises(StorageError, match=r"s3://nowhere/0000\.tar") as info:
            prepare_shards(DatasetArgs(shards=["s3://nowhere/{0000..0001}.tar"]),
                           str(tmp_path / "index"))
    finally:
        storage.clear_filesystem_cache()
    assert info.value.exit_code == ExitCode.STORAGE
    assert not committed(str(tmp_path / "index"))


# -- on the real S3 test server: trains, and resumes bit for bit ---------------------------


def _s3_shards(s3: SeaweedS3, prefix: str, count: int, per_shard: int) -> str:
    client = s3.filesystem()
    for k in range(count):
        keys = range(k * per_shard, (k + 1) * per_shard)
        members = [m for i in keys for m in
                   sample(f"{i:06d}", image=png(40 + 8 * (i % 3), 40, (i * 9 % 256, 90, 30)),
                          caption=f"a red shape number {i}", meta={"score": i})]
        client.pipe_file(f"{prefix}/shards/{k:04d}.tar", shard_bytes(members))
    return f"{prefix}/shards/{{0000..{count - 1:04d}}}.tar"


@pytest.mark.timeout(600)
def test_s3_shard_set_streams_and_two_segments_equal_one_run_bitwise(
    s3: SeaweedS3, s3_prefix: str, tmp_path: Path
) -> None:
    pattern = _s3_shards(s3, s3_prefix, count=3, per_shard=6)
    dataset = {"shards": [pattern], "filters": [{"field": "score", "op": "<", "value": 16}]}
    steps = {"train_args.max_train_steps": 4, "dataset": dataset}
    one = make_task(**steps, **{"train_args.num_train_steps": 4})
    split = make_task(**steps, **{"train_args.num_train_steps": 2})

    data = load_dataset_for_task(one, None)
    assert len(data) == 16 and isinstance(data.parts[0], ShardDataset)
    single = run_chain(one, tmp_path / "one")  # given a cache root: streamed all the same
    chain = run_chain(split, tmp_path / "split", cache=False)

    assert [r.global_step for r in chain] == [2, 4]
    assert single[0].finished and chain[-1].finished
    assert single[0].cache is None and not (tmp_path / "one" / "cache").exists()
    assert checkpoint_bytes(single[0].checkpoint) == checkpoint_bytes(chain[-1].checkpoint)


def test_a_truncated_shard_on_s3_is_refused_and_nothing_is_committed(
    s3: SeaweedS3, s3_prefix: str
) -> None:
    whole = shard_of(range(3))
    s3.filesystem().pipe_file(f"{s3_prefix}/shards/0000.tar", whole[: len(whole) // 2 + 100])
    index = f"{s3_prefix}/index"
    with pytest.raises(DatasetError, match=r"shard s3://.*/0000\.tar is truncated"):
        prepare_shards(DatasetArgs(shards=[f"{s3_prefix}/shards/{{0000..0000}}.tar"]), index)
    assert not committed(index)
