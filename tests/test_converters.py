"""Native annotation formats -> unified queries: the expected records, and every kind of bad line located."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.data.converters import FORMATS, convert, merge_sources, read_durations
from stages.data.errors import PipelineError
from stages.data.schema import Query, VideoPart, read_queries, write_queries

SAMPLES = Path(__file__).parent / "data" / "annotations"


def by_id(queries: list[Query]) -> dict[str, Query]:
    return {q.query_id: q for q in queries}


def test_tvr_release_converts_to_expected_records() -> None:
    result = convert({"train": SAMPLES / "tvr_sample_release.jsonl"}, "tvr")
    assert result.bad_lines == []
    assert result.queries == [
        Query("90200", "Phoebe puts one of her ponytails in her mouth.", "friends_s01e03_seg02_clip_19", 61.4,
              ((16.48, 33.87),), "train"),
        Query("90201", "Joey says he does not know.", "friends_s01e03_seg02_clip_19", 61.4, ((0.0, 2.5),), "train"),
        Query("4", "Sheldon sits on the couch.", "bbt_s05e12_seg02_clip_08", 90.0, ((45.0, 90.0),), "train"),
    ]  # fmt: skip


def test_propy_jsonl_takes_one_window_a_list_of_windows_or_none() -> None:
    queries = by_id(convert({"val": SAMPLES / "propy_sample.jsonl"}, "propy").queries)
    assert queries["2579"].moments == ((0.0, 10.0), (12.0, 36.5))
    assert queries["2579"].video_id == "bP5KfdFJzC4_660.0_810.0" and queries["2579"].duration == 150.0
    assert queries["v_QOlSCBRmfWY#0"].moments == ((0.83, 19.86),)
    assert queries["9770"].moments == () and queries["9770"].split == "val"


def test_qvhighlights_converts_windows_and_the_test_split_without_them() -> None:
    files = {"val": SAMPLES / "highlight_sample_release.jsonl", "test": SAMPLES / "highlight_sample_test_release.jsonl"}
    result = convert(files, "qvhighlights")
    assert result.bad_lines == []
    assert [q.query_id for q in result.queries] == ["8737", "2579", "2"]
    first, second, test = result.queries
    assert first == Query(
        "8737", "A family is playing basketball together on a green court outside.", "bP5KfdFJzC4_660.0_810.0",
        126.0, ((0.0, 6.0),), "val",
    )  # fmt: skip
    assert second.moments == ((0.0, 4.0), (10.0, 14.0))
    assert test.moments == () and test.split == "test" and test.duration == 150.0


def test_activitynet_queries_are_numbered_per_video_and_stripped() -> None:
    result = convert({"train": SAMPLES / "activitynet_sample_train.json"}, "activitynet")
    assert result.bad_lines == []
    queries = by_id(result.queries)
    assert list(queries) == [f"v_QOlSCBRmfWY#{k}" for k in range(3)] + [f"v_ehGHCYKzyZ8#{k}" for k in range(2)]
    assert queries["v_QOlSCBRmfWY#1"] == Query(
        "v_QOlSCBRmfWY#1", "The girl dances around the room while the camera captures her movements.", "v_QOlSCBRmfWY",
        82.73, ((17.37, 60.81),), "train",
    )  # fmt: skip
    assert queries["v_ehGHCYKzyZ8#1"].moments == ((11.11, 61.72),)


def test_charades_sta_takes_durations_from_the_charades_csv() -> None:
    durations, bad = read_durations([SAMPLES / "Charades_v1_sample.csv"])
    assert bad == [] and durations == {"AO8RW": 33.67, "Y6R7T": 20.25}
    result = convert({"test": SAMPLES / "charades_sta_sample.txt"}, "charades", durations)
    assert result.bad_lines == []
    assert result.queries == [
        Query("AO8RW#0", "a person is putting a book on a shelf.", "AO8RW", 33.67, ((0.0, 6.9),), "test"),
        Query("AO8RW#1", "person begins to play on a phone.", "AO8RW", 33.67, ((5.6, 12.9),), "test"),
        Query("Y6R7T#0", "a person is sitting on the floor.", "Y6R7T", 20.25, ((1.1, 9.5),), "test"),
    ]


def test_mscaption_keeps_caption_ids_and_has_no_moments() -> None:
    durations, _ = read_durations([SAMPLES / "tvr_sample_durations.csv"])
    result = convert({"train": SAMPLES / "tvr_sample.caption.txt"}, "mscaption", durations)
    assert result.bad_lines == []
    assert result.queries == [
        Query("friends_s01e03_seg02_clip_19#enc#0", "Phoebe puts one of her ponytails in her mouth.",
              "friends_s01e03_seg02_clip_19", 61.4, (), "train"),
        Query("friends_s01e03_seg02_clip_19#enc#1", "Joey says he does not  know.", "friends_s01e03_seg02_clip_19",
              61.4, (), "train"),
        Query("bbt_s05e12_seg02_clip_08#enc#0", "Sheldon sits on the couch.", "bbt_s05e12_seg02_clip_08", 90.0, (),
              "train"),
    ]  # fmt: skip


def tvr_line(desc_id: object = 1, desc: object = "a man waves", vid: object = "show_clip_1", **fields: object) -> str:
    """One TVR release line; `duration` (60) and `ts` ([1, 2]) can be overridden."""
    obj = {"desc_id": desc_id, "desc": desc, "vid_name": vid, "duration": 60.0, "ts": [1.0, 2.0]}
    return json.dumps(obj | fields)


BAD_LINES = {
    "missing field": ("tvr", '{"desc_id": 7, "desc": "a man waves", "duration": 60}', "missing field(s) vid_name"),
    "unparsable json": ("tvr", '{"desc_id": 7, "desc": "a man waves",', "unparsable JSON"),
    "not an object": ("tvr", "[1, 2]", "not a JSON object"),
    "moment after the end": ("tvr", tvr_line(ts=[50, 61]), "moment [50, 61] is outside [0, 60]"),
    "negative moment": ("tvr", tvr_line(ts=[-1, 3]), "is outside [0, 60]"),
    "moment reversed": ("tvr", tvr_line(ts=[5, 3]), "starts after it ends"),
    "moment not a pair": ("tvr", tvr_line(ts=[1, 2, 3]), "not [start, end]"),
    "empty query": ("tvr", tvr_line(desc="   "), "empty query"),
    "query not a string": ("tvr", tvr_line(desc=None), "is not a string"),
    "path as video id": ("tvr", tvr_line(vid="../etc/passwd"), "bad video id '../etc/passwd'"),
    "dot-dot video id": ("tvr", tvr_line(vid="a..b"), "bad video id 'a..b'"),
    "slash in video id": ("tvr", tvr_line(vid="a/b"), "bad video id 'a/b'"),
    "duration not a number": ("tvr", tvr_line(duration="sixty"), "duration 'sixty' is not a number"),
    "zero duration": ("tvr", tvr_line(duration=0), "is not > 0"),
    "nan moment": ("tvr", tvr_line(ts=["nan", 2]), "is not finite"),
    "bool query id": ("tvr", tvr_line(desc_id=True), "query id True"),
    "slash in query id": ("tvr", tvr_line(desc_id="a/1"), "contains '/'"),
    "charades number": ("charades", "AO8RW 1.O 6.9##a person sits.", "moment start '1.O' is not a number"),
    "charades layout": ("charades", "AO8RW 0.0 6.9 a person sits.", "expected '<video_id> <start> <end>##<sentence>'"),
    "charades unknown video": ("charades", "ZZZZZ 0.0 6.9##a person sits.", "unknown duration of video 'ZZZZZ'"),
    "mscaption tab": ("mscaption", "AO8RW#enc#0\ta person sits.", "a TAB in the caption id"),
    "mscaption id": ("mscaption", "AO8RW#0 a person sits.", "is not '<video_id>#enc#<k>'"),
    "mscaption empty": ("mscaption", "AO8RW#enc#0 ", "empty query"),
}


GOOD_LINES = {
    "tvr": (tvr_line(desc_id=0), tvr_line(desc_id=5)),
    "charades": ("AO8RW 0.0 6.9##a person sits.", "AO8RW 1.0 3.5##a person stands."),
    "mscaption": ("AO8RW#enc#8 a person sits.", "AO8RW#enc#9 a person stands."),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_each_kind_of_bad_line_is_reported_with_file_line_and_reason(tmp_path: Path, case: str) -> None:
    fmt, bad_line, reason = BAD_LINES[case]
    first, last = GOOD_LINES[fmt]
    path = tmp_path / "native.txt"
    path.write_text(f"{first}\n\n{bad_line}\n{last}\n")  # the blank line 2 is skipped but counted
    durations = {"AO8RW": 30.0} if FORMATS[fmt].needs_durations else None
    result = convert({"train": path}, fmt, durations)
    assert len(result.bad_lines) == 1, [str(b) for b in result.bad_lines]
    bad = result.bad_lines[0]
    assert str(bad).startswith(f"{path}:3: ")
    assert reason in bad.reason
    assert bad.where.text == bad_line
    assert len(result.queries) == 2


def test_duplicate_query_ids_are_reported_across_files(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(tvr_line(desc_id=1) + "\n" + tvr_line(desc_id=2) + "\n")
    (tmp_path / "val.jsonl").write_text(tvr_line(desc_id=3) + "\n" + tvr_line(desc_id=1) + "\n")
    result = convert({"train": tmp_path / "train.jsonl", "val": tmp_path / "val.jsonl"}, "tvr")
    assert [str(b) for b in result.bad_lines] == [
        f"{tmp_path / 'val.jsonl'}:2: duplicate query id '1' (first at {tmp_path / 'train.jsonl'}:1)"
    ]
    assert [(q.query_id, q.split) for q in result.queries] == [("1", "train"), ("2", "train"), ("3", "val")]


def test_a_video_given_two_durations_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(tvr_line(desc_id=1) + "\n" + tvr_line(desc_id=2, duration=61.0) + "\n")
    (bad,) = convert({"train": path}, "tvr").bad_lines
    assert str(bad) == f"{path}:2: video 'show_clip_1' has duration 61 here but 60 at {path}:1"


def test_every_problem_is_collected_not_just_the_first(tmp_path: Path) -> None:
    lines = [tvr_line(desc_id=i, ts=[70, 80] if i % 3 == 0 else [1, 2]) for i in range(10)]
    lines[4] = "not json"
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = convert({"train": path}, "tvr")
    assert [b.where.line for b in result.bad_lines] == [1, 4, 5, 7, 10]
    assert len(result.queries) == 5


def test_moment_tolerance_clips_small_overruns_only(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(tvr_line(desc_id=1, ts=[-0.2, 60.3]) + "\n" + tvr_line(desc_id=2, ts=[1, 61]) + "\n")
    result = convert({"train": path}, "tvr", moment_tolerance=0.5)
    assert result.queries[0].moments == ((0.0, 60.0),)
    assert [b.where.line for b in result.bad_lines] == [2]


def test_activitynet_problems_are_located_at_the_video_key(tmp_path: Path) -> None:
    path = tmp_path / "val_1.json"
    path.write_text(
        '{\n"v_a": {"duration": 10, "timestamps": [[0, 4]], "sentences": ["fine."]},\n'
        '"v_b": {"duration": 10, "timestamps": [[0, 4], [2, 12]], "sentences": ["fine.", "too long."]},\n'
        '"v_c": {"duration": 10, "timestamps": [[0, 4]], "sentences": ["one.", "two."]},\n'
        '"v_a": {"duration": 10, "timestamps": [[0, 4]], "sentences": ["again."]}\n}\n'
    )
    result = convert({"val": path}, "activitynet")
    assert [str(b) for b in result.bad_lines] == [
        f"{path}:3 [v_b#1]: moment [2, 12] is outside [0, 10] (the video's duration)",
        f"{path}:4 [v_c]: timestamps and sentences are not two lists of the same length",
        f"{path}:5 [v_a#0]: duplicate query id 'v_a#0' (first at {path}:2 [v_a#0])",
    ]
    assert [q.query_id for q in result.queries] == ["v_a#0", "v_b#0"]


def test_activitynet_broken_json_is_one_located_problem(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('{"v_a": {"duration": 10, "timestamps": [[0, 4]], "sentences": ["ok"]},\n"v_b": {"duration": }\n}')
    result = convert({"train": path}, "activitynet")
    assert result.queries == []
    assert [str(b) for b in result.bad_lines] == [f"{path}:2: unparsable JSON (Expecting value at column 21)"]


def test_durations_table_reports_bad_rows_and_requires_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "durations.csv"
    path.write_text("id,length\nA,10\nB,ten\nA,11\nA,10\n")
    durations, bad = read_durations([path])
    assert durations == {"A": 10.0}
    assert [str(b) for b in bad] == [
        f"{path}:3: length 'ten' is not a number",
        f"{path}:4: video 'A' has another length at {path}:2",
    ]
    with pytest.raises(PipelineError, match="no column"):
        read_durations([path], length_column="seconds")


def test_format_options_are_checked(tmp_path: Path) -> None:
    sample = SAMPLES / "charades_sta_sample.txt"
    with pytest.raises(PipelineError, match="has no video durations"):
        convert({"train": sample}, "charades")
    with pytest.raises(PipelineError, match="only for charades/mscaption"):
        convert({"train": SAMPLES / "tvr_sample_release.jsonl"}, "tvr", {"a": 1.0})
    with pytest.raises(PipelineError, match="only for qvhighlights"):
        convert({"train": SAMPLES / "tvr_sample_release.jsonl"}, "tvr", merge_clip_sources=True)
    with pytest.raises(PipelineError, match="unknown annotation format"):
        convert({"train": sample}, "msrvtt")
    with pytest.raises(PipelineError, match=r"not found: .*missing\.jsonl"):
        convert({"train": tmp_path / "missing.jsonl"}, "tvr")


def qvh_line(qid: int, vid: str, windows: list[list[float]], duration: float = 150) -> str:
    obj = {"qid": qid, "query": f"query {qid}", "duration": duration, "vid": vid, "relevant_windows": windows}
    return json.dumps(obj)


def test_qvhighlights_resplit_merges_the_clips_of_one_source(tmp_path: Path) -> None:
    train, val = tmp_path / "highlight_train_release.jsonl", tmp_path / "highlight_val_release.jsonl"
    train.write_text(
        "\n".join([
            qvh_line(1, "src_A-1_150.0_300.0", [[10, 20]]),
            qvh_line(2, "otherB_30.0_180.0", [[0, 4]]),
            qvh_line(3, "src_A-1_0.0_150.0", [[140, 150], [0, 2]]),
            qvh_line(4, "src_A-1_150.0_300.0", [[0, 150]]),
            qvh_line(5, "shared_0.0_150.0", [[1, 2]]),
        ]) + "\n"
    )  # fmt: skip
    val.write_text(qvh_line(6, "shared_300.0_420.0", [[5, 6]], duration=120) + "\n")
    result = convert({"train": train, "test": val}, "qvhighlights", merge_clip_sources=True)
    assert result.bad_lines == []
    queries = by_id(result.queries)
    assert list(queries) == ["1", "2", "3", "4", "5", "6"]  # every query kept, in file order
    a_parts = (VideoPart("src_A-1_0.0_150.0", 0.0, 150.0), VideoPart("src_A-1_150.0_300.0", 150.0, 150.0))
    assert queries["1"] == Query("1", "query 1", "src_A-1", 300.0, ((160.0, 170.0),), "train", a_parts)
    assert queries["3"].moments == ((140.0, 150.0), (0.0, 2.0)) and queries["3"].video_id == "src_A-1"
    assert queries["4"].moments == ((150.0, 300.0),)
    assert queries["2"].parts == (VideoPart("otherB_30.0_180.0", 0.0, 150.0),) and queries["2"].video_id == "otherB"
    # a source with clips in two splits becomes one video per split, with distinct ids
    assert (queries["5"].video_id, queries["5"].duration) == ("shared_train", 150.0)
    assert (queries["6"].video_id, queries["6"].duration, queries["6"].split) == ("shared_test", 120.0, "test")
    assert {q.video_id for q in result.queries if q.split == "train"} == {"src_A-1", "otherB", "shared_train"}


def test_resplit_reports_video_ids_without_a_source(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(qvh_line(1, "plainvideo", [[1, 2]]) + "\n" + qvh_line(2, "s_0_150", [[1, 2]]) + "\n")
    result = convert({"train": path}, "qvhighlights", merge_clip_sources=True)
    assert [str(b) for b in result.bad_lines] == [
        f"{path}:1: video id 'plainvideo' is not '<source>_<start>_<end>', so its source cannot be merged"
    ]
    assert [q.video_id for q in result.queries] == ["s"]
    assert merge_sources([]) == ([], [])


def test_merged_parts_survive_the_unified_file(tmp_path: Path) -> None:
    parts = (VideoPart("s_0_150", 0.0, 150.0), VideoPart("s_150_300", 150.0, 150.0))
    queries = [Query("1", "q", "s", 300.0, ((160.0, 170.0),), "train", parts), Query("2", "r", "v", 5.0, (), "test")]
    write_queries(tmp_path / "a.jsonl", queries)
    assert read_queries(tmp_path / "a.jsonl") == queries
    assert "parts" not in json.loads((tmp_path / "a.jsonl").read_text().splitlines()[1])
