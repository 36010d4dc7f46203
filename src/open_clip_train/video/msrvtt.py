"""MSR-VTT annotations (the layout CLIP4Clip, X-CLIP and TeachCLIP use) -> typed caption lists.

ROOT holds `MSRVTT_data.json` (`videos` with `video_id` and `split`; `sentences` with `caption`,
`video_id`, `sen_id`), the training lists `MSRVTT_train.9k.csv` / `MSRVTT_train.7k.csv` (column
`video_id`) and the 1k-A test list `MSRVTT_JSFUSION_test.csv` (`key,vid_key,video_id,sentence`).

Every split is a `VideoCaptions`: unique videos in a fixed order, each with its captions, so that
training can expand one sample per caption (CLIP4Clip's `expand_msrvtt_sentences`) or draw one
caption per video (CSR `offsets`), and evaluation keeps a caption -> video index.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_JSON = "MSRVTT_data.json"
TRAIN_CSVS = {"9k": "MSRVTT_train.9k.csv", "7k": "MSRVTT_train.7k.csv"}
TEST_1KA_CSV = "MSRVTT_JSFUSION_test.csv"
TEST_SPLITS = ("1k-A", "full")


@dataclass
class VideoCaptions:
    """Videos with their captions. `sentence_ids`: the json's `sen_id` (1k-A: the csv row number)."""

    video_ids: list[str]
    captions: list[list[str]]
    sentence_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)

    def offsets(self) -> torch.Tensor:
        """CSR offsets of each video's captions in the flattened caption list."""
        counts = torch.tensor([len(c) for c in self.captions], dtype=torch.long)
        return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    def text_to_video(self) -> torch.Tensor:
        """[C] video index of each flattened caption."""
        return torch.repeat_interleave(torch.arange(len(self.video_ids)), self.offsets().diff())

    def flat_captions(self) -> list[str]:
        return [c for cs in self.captions for c in cs]

    def pair_ids(self) -> torch.Tensor:
        """[C, 2] int64 (video number, sentence id) of every caption: stable keys for a feature
        cache (the number of `video7020` is 7020; videos not named like that use their index)."""
        numbers = video_numbers(self.video_ids)
        video = torch.repeat_interleave(torch.tensor(numbers, dtype=torch.long), self.offsets().diff())
        sentence = torch.tensor([s for ids in self.sentence_ids for s in ids], dtype=torch.long)
        return torch.stack([video, sentence], dim=1)

    def head(self, n: int | None) -> "VideoCaptions":
        """The first n videos (all when n is None)."""
        return VideoCaptions(self.video_ids[:n], self.captions[:n], self.sentence_ids[:n])


def video_numbers(video_ids: list[str]) -> list[int]:
    found = [re.fullmatch(r"video(\d+)", v) for v in video_ids]
    if all(found) and len({int(m.group(1)) for m in found}) == len(found):
        return [int(m.group(1)) for m in found]
    return list(range(len(video_ids)))


@dataclass
class MsrvttAnnotations:
    """The parsed MSRVTT_data.json: video splits and sentences grouped by video (by sen_id)."""

    path: Path
    split_of: dict[str, str]  # video_id -> train / validate / test
    sentences: dict[str, list[tuple[int, str]]]  # video_id -> [(sen_id, caption)] sorted by sen_id


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: MSR-VTT annotation file not found (expected under the data root)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from None


def load_annotations(root: str | Path) -> MsrvttAnnotations:
    path = Path(root) / DATA_JSON
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list) \
            or not isinstance(data.get("sentences"), list):
        raise ValueError(f"{path}: expected an object with 'videos' and 'sentences' lists")
    split_of = {}
    for i, v in enumerate(data["videos"]):
        if not isinstance(v, dict) or "video_id" not in v:
            raise ValueError(f"{path}: videos[{i}] has no 'video_id'")
        split_of[v["video_id"]] = v.get("split", "")
    sentences: dict[str, list[tuple[int, str]]] = {}
    for i, s in enumerate(data["sentences"]):
        if not isinstance(s, dict) or not all(k in s for k in ("caption", "video_id", "sen_id")):
            raise ValueError(f"{path}: sentences[{i}] needs 'caption', 'video_id' and 'sen_id'")
        if not isinstance(s["caption"], str):
            raise ValueError(f"{path}: sentences[{i}] caption is not a string")
        sentences.setdefault(s["video_id"], []).append((int(s["sen_id"]), s["caption"].strip()))
    for caps in sentences.values():
        caps.sort()
    return MsrvttAnnotations(path, split_of, sentences)


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column '{missing[0]}' (has {reader.fieldnames})")
            return list(reader)
    except FileNotFoundError:
        raise ValueError(f"{path}: MSR-VTT split file not found") from None


def _with_sentences(ann: MsrvttAnnotations, video_ids: list[str], source: Path) -> VideoCaptions:
    out = VideoCaptions([], [], [])
    for vid in video_ids:
        caps = ann.sentences.get(vid)
        if not caps:
            raise ValueError(f"{source}: video {vid} has no sentence in {ann.path}")
        out.video_ids.append(vid)
        out.sentence_ids.append([s for s, _ in caps])
        out.captions.append([c for _, c in caps])
    return out


def train_split(root: str | Path, which: str = "9k", ann: MsrvttAnnotations | None = None) -> VideoCaptions:
    """Training videos (`which`: 9k, 7k, or a csv path with a `video_id` column), all captions each."""
    ann = ann or load_annotations(root)
    path = Path(root) / TRAIN_CSVS[which] if which in TRAIN_CSVS else Path(which)
    ids = list(dict.fromkeys(r["video_id"].strip() for r in _read_csv(path, ("video_id",))))
    if not ids:
        raise ValueError(f"{path}: no training video listed")
    return _with_sentences(ann, ids, path)


def test_split(root: str | Path, which: str = "1k-A", ann: MsrvttAnnotations | None = None) -> VideoCaptions:
    """1k-A: the JSFUSION csv, one caption per row (sentence id = row number). full: every video whose
    json split is `test` (sorted by number), with all its sentences."""
    if which == "1k-A":
        path = Path(root) / TEST_1KA_CSV
        rows = _read_csv(path, ("video_id", "sentence"))
        out = VideoCaptions([], [], [])
        index: dict[str, int] = {}
        for row_number, r in enumerate(rows):
            vid = r["video_id"].strip()
            if vid not in index:
                index[vid] = len(out.video_ids)
                out.video_ids.append(vid)
                out.captions.append([])
                out.sentence_ids.append([])
            out.captions[index[vid]].append(r["sentence"].strip())
            out.sentence_ids[index[vid]].append(row_number)
        if not out.video_ids:
            raise ValueError(f"{path}: no test row")
        return out
    if which == "full":
        ann = ann or load_annotations(root)
        ids = [v for v, s in ann.split_of.items() if s == "test"]
        if not ids:
            raise ValueError(f"{ann.path}: no video has split 'test'")
        ids.sort(key=lambda v: (len(v), v))  # video2 before video10
        return _with_sentences(ann, ids, ann.path)
    raise ValueError(f"unknown MSR-VTT test split {which!r}; expected one of {TEST_SPLITS}")


def video_path(video_dir: str | Path, video_id: str) -> Path:
    return Path(video_dir) / f"{video_id}.mp4"
