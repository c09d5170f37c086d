"""ScienceQA's release -> LLaVA's training json, in the prompt formats of LLaVA's conversion.

    python -m fastllava.data.scienceqa --problems problems.json --splits pid_splits.json \\
        --images images --format QCM-LEA --out OUT

reproduces LLaVA's `scripts/convert_sqa_to_llava.py convert_to_llava` (with the prompt builder of
`scripts/convert_sqa_to_llava_base_prompt.py`, `build_prompt_chatbot` / `create_one_example_chatbot`)
for every split of pid_splits.json: OUT/llava_<split>_<format>.json, a list of {"id", "image"
("<pid>/<file>", relative to images/<the problem's split>), "conversations": [human, gpt]}, written as
json.dump(..., indent=2) writes it. For the test split OUT also gets what the `scienceqa` eval task reads:
llava_test_CQM-A.json, problems.json, pid_splits.json and images/ (a link to --images when it lives elsewhere).

llava_<split>_CQM-A.json is LLaVA-1.5's question file (`eval_question`), not the first LLaVA's CQM-A:
like the llava_test_CQM-A.json of LLaVA's eval.zip (what scripts/v1_5/eval/sqa.sh asks), each human turn is
"<image>\\n" for an image problem, "Context: <hint>\\n" when the hint is not empty (image or not), the
question, then "\\nA. <choice>" per choice, and the answer is the bare letter. LLaVA's repository has no script
that writes that file; this layout was matched entry by entry to a public copy of it (see the tests).
model_vqa_science.py --single-pred-prompt appends "Answer with the option's letter ..." when it asks; the file
does not hold it.

Every other format is the first LLaVA's, INPUT-OUTPUT. Inputs: CQM "Context/Question/Options", QCM, and with
the lecture (L) and/or the solution (E) after "BECAUSE:" QCML, QCME, QCMLE (after the options) or QCLM, QCEM,
QCLEM (before them). Outputs: A "The answer is X.", AL, AE, ALE, AEL ("The answer is X. BECAUSE: ..."), LA,
EA, LEA, ELA ("... The answer is X.") and LEPA ("LECTURE: ...\\nSOLUTION: ...\\n###\\nANSWER: X."). LLaVA's
quirks are kept, since they are what its models were trained on: AL appends the SOLUTION and AE the LECTURE
(the letters swapped); double spaces become single (once); a text ending in "BECAUSE:" loses every
"BECAUSE:"; a leading "Question: " / "Answer: " is removed everywhere in the text; a literal backslash-n in a
lecture or solution becomes a newline. One difference in layout: LLaVA appends "\\n<image>" to an image
problem's human turn, we put "<image>\\n" in front, which is where LLaVA's training (preprocess_multimodal)
and evaluation (model_vqa_science.py) move it anyway: the tokens are the same.

A malformed problem (not an object, a field missing or of the wrong type, fewer than 2 or more than 5
choices, an answer index out of range, an image named but not on disk, a pid listed in a split but absent
from problems.json) is skipped: logged with its pid and reason, counted, and listed in
OUT/scienceqa_skipped.json. The exit status is 0 when anything converted, 1 when nothing did, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..progress import progress

log = logging.getLogger(__name__)

OPTIONS = ("A", "B", "C", "D", "E")  # LLaVA's `options`: at most five choices have a letter
INPUT_FORMATS = ("CQM", "QCM", "QCML", "QCME", "QCMLE", "QCLM", "QCEM", "QCLEM")
OUTPUT_FORMATS = ("A", "AL", "AE", "ALE", "AEL", "LA", "EA", "LEA", "ELA", "LEPA")
EVAL_FORMAT = "CQM-A"  # the question file of LLaVA-1.5's ScienceQA evaluation (scripts/v1_5/eval/sqa.sh)
_STRING_FIELDS = ("question", "hint", "lecture", "solution")


def check_format(fmt: str) -> tuple[str, str]:
    """(input, output) of "INPUT-OUTPUT"; ValueError naming the allowed parts otherwise."""
    parts = fmt.split("-")
    if len(parts) != 2 or parts[0] not in INPUT_FORMATS or parts[1] not in OUTPUT_FORMATS:
        raise ValueError(f"prompt format {fmt!r}: expected INPUT-OUTPUT with INPUT one of {', '.join(INPUT_FORMATS)} "
                         f"and OUTPUT one of {', '.join(OUTPUT_FORMATS)} (e.g. QCM-LEA)")
    return parts[0], parts[1]


def problem_error(problem) -> str | None:
    """Why `problem` (a problems.json value) cannot be converted, or None."""
    if not isinstance(problem, dict):
        return f"expected an object, got {type(problem).__name__}"
    for key in _STRING_FIELDS:
        if key not in problem:
            return f"missing field {key!r}"
        if not isinstance(problem[key], str):
            return f"field {key!r}: expected a string, got {type(problem[key]).__name__}"
    choices = problem.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        return "field 'choices': expected a list of strings" if "choices" in problem else "missing field 'choices'"
    if not 2 <= len(choices) <= len(OPTIONS):
        return f"{len(choices)} choices: expected 2 to {len(OPTIONS)} (letters A-E)"
    answer = problem.get("answer")
    if "answer" not in problem:
        return "missing field 'answer'"
    if not isinstance(answer, int) or isinstance(answer, bool):
        return f"field 'answer': expected a choice index (int), got {answer!r}"
    if not 0 <= answer < len(choices):
        return f"answer index {answer} out of range for {len(choices)} choices"
    if "image" not in problem:
        return "missing field 'image' (a file name or null)"
    if problem["image"] is not None and (not isinstance(problem["image"], str) or not problem["image"]):
        return f"field 'image': expected a file name or null, got {problem['image']!r}"
    return None


def context_text(problem: Mapping) -> str:
    """The hint, or "N/A" (LLaVA converts without image captions)."""
    return problem["hint"].strip() or "N/A"


def choice_text(problem: Mapping) -> str:
    """"(A) first (B) second ..."."""
    return " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))


def _unescape(text: str) -> str:
    # get_lecture_text writes newlines as "\\n" and build_prompt_chatbot turns every "\\n" back into a
    # newline: real newlines survive, and a literal backslash-n in the release becomes one too.
    return text.replace("\n", "\\n").replace("\\n", "\n")


def build_example(problem: Mapping, fmt: str) -> tuple[str, str]:
    """(human text, gpt text) of one problem in the first LLaVA's prompt format `fmt`, exactly as
    convert_to_llava writes them (without the image tag); "CQM-A" too, which is not what the CQM-A files hold
    (`eval_question`). `problem` must pass `problem_error`."""
    input_format, output_format = check_format(fmt)
    question, context, choice = problem["question"], context_text(problem), choice_text(problem)
    answer = OPTIONS[problem["answer"]]
    lecture, solution = _unescape(problem["lecture"]), _unescape(problem["solution"])
    because = {"L": lecture, "E": solution, "LE": f"{lecture} {solution}"}
    head = f"Question: {question}\nContext: {context}\n"
    if input_format == "CQM":
        text = f"Context: {context}\nQuestion: {question}\nOptions: {choice}\n"
    elif input_format == "QCM":
        text = f"{head}Options: {choice}\n"
    elif input_format.startswith("QCM"):  # QCML, QCME, QCMLE: the reason after the options
        text = f"{head}Options: {choice}\nBECAUSE: {because[input_format[3:]]}\n"
    else:  # QCLM, QCEM, QCLEM: the reason before them
        text = f"{head}BECAUSE: {because[input_format[2:-1]]}\nOptions: {choice}\n"
    final = f"The answer is {answer}."
    if output_format == "LEPA":
        out = f"LECTURE: {lecture}\n" if lecture.strip() else ""
        out += f"SOLUTION: {solution}\n" if solution.strip() else ""
        out += f"###\nANSWER: {answer}."
    else:
        # LLaVA's table, its AL/AE swap included: "AL" appends the solution and "AE" the lecture.
        body = {"A": final, "AL": f"{final} BECAUSE: {solution}", "AE": f"{final} BECAUSE: {lecture}",
                "ALE": f"{final} BECAUSE: {lecture} {solution}", "AEL": f"{final} BECAUSE: {solution} {lecture}",
                "LA": f"{lecture} {final}", "EA": f"{solution} {final}", "LEA": f"{lecture} {solution} {final}",
                "ELA": f"{solution} {lecture} {final}"}[output_format]
        out = f"Answer: {body}"
    text, out = _tidy(text), _tidy(out)
    if text.startswith("Question: "):
        text = text.replace("Question: ", "")
    if out.startswith("Answer: "):
        out = out.replace("Answer: ", "")
    return text, out


def eval_question(problem: Mapping) -> tuple[str, str]:
    """(human text, gpt text) of one problem as LLaVA-1.5's llava_test_CQM-A.json holds it (without the image
    tag): "Context: <hint>\\n" unless the hint is empty, the question, "\\nA. <choice>" per choice; the answer's
    letter. `problem` must pass `problem_error`."""
    hint = problem["hint"].strip()
    text = (f"Context: {hint}\n" if hint else "") + problem["question"]
    text += "".join(f"\n{OPTIONS[i]}. {c}" for i, c in enumerate(problem["choices"]))
    # LLaVA's file has no double space (e.g. problem 332's hint "The  is adapted" reads "The is adapted"),
    # as the first LLaVA's formats after their one replace.
    return text.replace("  ", " ").strip(), OPTIONS[problem["answer"]]


def _tidy(text: str) -> str:
    text = text.replace("  ", " ").strip()
    return text.replace("BECAUSE:", "").strip() if text.endswith("BECAUSE:") else text


def to_llava(pid: str, problem: Mapping, fmt: str) -> dict:
    """One entry of llava_<split>_<fmt>.json: {"id", "image"?, "conversations"}; "<image>\\n" leads an image
    problem's turn. Format "CQM-A" is LLaVA-1.5's question file, every other the first LLaVA's."""
    human, gpt = eval_question(problem) if fmt == EVAL_FORMAT else build_example(problem, fmt)
    entry: dict = {"id": pid}
    if problem["image"] is not None:
        entry["image"] = f"{pid}/{problem['image']}"
        human = "<image>\n" + human
    entry["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return entry


@dataclass
class Skipped:
    """A problem left out: its pid, the split that listed it, and why."""

    pid: str
    split: str
    reason: str


def image_path(images: Path, pid: str, problem: Mapping, split: str) -> Path:
    """Where the release keeps a problem's image: images/<the problem's own split>/<pid>/<file> (a problem of
    trainval / minival / ... lives under train/ or val/)."""
    return images / str(problem.get("split") or split) / pid / problem["image"]


def convert_split(problems: Mapping, pids: Sequence, split: str, images: Path, fmt: str,
                  skipped: list[Skipped], *, show_progress: bool = True) -> list[dict]:
    """The entries of `split` in format `fmt`; each malformed problem is logged and appended to `skipped`."""
    entries = []
    with progress(len(pids), desc=f"scienceqa {split} {fmt}", unit="problem", enabled=show_progress) as bar:
        for pid in pids:
            bar.update(1)
            pid = str(pid)
            if pid not in problems:
                reason = "listed in pid_splits.json but not in problems.json"
            else:
                reason = problem_error(problems[pid])
                if reason is None and problems[pid]["image"] is not None:
                    path = image_path(images, pid, problems[pid], split)
                    if not path.is_file():
                        reason = f"image {problems[pid]['image']!r} not found: expected the file {path}"
            if reason is not None:
                log.warning("scienceqa: skipped problem %s (split %s): %s", pid, split, reason)
                skipped.append(Skipped(pid, split, reason))
                continue
            entries.append(to_llava(pid, problems[pid], fmt))
    return entries


def _read_json(path: Path, kind: type, what: str):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found (expected ScienceQA's {what})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected ScienceQA's {what}") from None
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected a JSON {'object' if kind is dict else 'list'} ({what}), "
                         f"got {type(data).__name__}")
    return data


def convert(problems_path: Path, splits_path: Path, images: Path, formats: Sequence[str], out: Path, *,
            splits: Sequence[str] | None = None, show_progress: bool = True) -> dict:
    """Write OUT/llava_<split>_<format>.json for each split and format, the eval task's files for the test
    split, and OUT/scienceqa_skipped.json. Returns {"written": {file: entries}, "skipped": [Skipped],
    "converted": total entries}. ValueError for unreadable inputs or an unknown split or format."""
    for fmt in formats:
        check_format(fmt)
    problems = _read_json(Path(problems_path), dict, "problems.json: {pid: problem}")
    all_splits = _read_json(Path(splits_path), dict, 'pid_splits.json: {"train": [pid, ...], ...}')
    names = list(all_splits) if splits is None else list(splits)
    for name in names:
        if name not in all_splits:
            raise ValueError(f"split {name!r} is not in {splits_path}; it has: {', '.join(all_splits)}")
        if not isinstance(all_splits[name], list):
            raise ValueError(f"{splits_path}: split {name!r}: expected a list of problem ids")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, skipped_by_split = {}, {}
    for name in names:
        pids = list(dict.fromkeys(str(p) for p in all_splits[name]))
        if len(pids) != len(all_splits[name]):
            log.warning("scienceqa: split %s lists %d problem ids more than once; each is converted once",
                        name, len(all_splits[name]) - len(pids))
        split_formats = list(formats) + ([EVAL_FORMAT] if name == "test" and EVAL_FORMAT not in formats else [])
        for i, fmt in enumerate(split_formats):
            skipped: list[Skipped] = []
            entries = convert_split(problems, pids, name, Path(images), fmt, skipped if i == 0 else [],
                                    show_progress=show_progress)
            if i == 0:
                skipped_by_split[name] = skipped
            path = out / f"llava_{name}_{fmt}.json"
            # json.dump's defaults (ASCII escapes, no final newline), as LLaVA's files: byte-equal for equal entries.
            path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
            written[str(path)] = len(entries)
            log.info("scienceqa: %s: %d of %d problems", path, len(entries), len(pids))
    skipped = [s for name in names for s in skipped_by_split[name]]
    (out / "scienceqa_skipped.json").write_text(json.dumps([vars(s) for s in skipped], indent=2), encoding="utf-8")
    if "test" in names:
        _eval_layout(Path(problems_path), Path(splits_path), Path(images), out,
                     {s.pid for s in skipped_by_split["test"]})
    converted = sum(written[str(out / f"llava_{n}_{formats[0]}.json")] for n in names)
    return {"written": written, "skipped": skipped, "converted": converted}


def _same(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _eval_layout(problems_path: Path, splits_path: Path, images: Path, out: Path, skipped_test: set[str]) -> None:
    """problems.json, pid_splits.json and images/ next to llava_test_CQM-A.json: the layout the `scienceqa`
    eval task reads (give `python -m fastllava.eval --data` the folder above OUT, OUT being named
    "scienceqa")."""
    if not _same(problems_path, out / "problems.json"):
        shutil.copyfile(problems_path, out / "problems.json")
    if not _same(splits_path, out / "pid_splits.json"):
        shutil.copyfile(splits_path, out / "pid_splits.json")
    if skipped_test:
        # The eval scores every test pid of pid_splits.json; a skipped one would be an unanswered question.
        log.warning("scienceqa: %d test problems were skipped (%s); the eval task will find them in %s with no "
                    "question", len(skipped_test), ", ".join(sorted(skipped_test)[:10]), out / "pid_splits.json")
    link = out / "images"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(images.resolve(), target_is_directory=True)
    elif not _same(link, images):
        log.warning("scienceqa: %s exists and is not %s; the eval task reads its test images from %s", link,
                    images, link / "test")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastllava.data.scienceqa",
        description="Convert ScienceQA (problems.json, pid_splits.json, images/<split>/<pid>/image.png) into "
                    "LLaVA's training json, one file per split and format (llava_<split>_<format>.json), as "
                    "LLaVA's scripts/convert_sqa_to_llava.py does; for the test split also the files the "
                    "`scienceqa` eval task reads. Malformed problems are skipped, named in the log and listed "
                    "in scienceqa_skipped.json.",
        epilog="Exit status: 0 when at least one problem converted (even with some skipped), 1 when none did, "
               "2 for bad arguments or unreadable input files.")
    parser.add_argument("--problems", required=True, help="ScienceQA's problems.json")
    parser.add_argument("--splits", required=True, help="ScienceQA's pid_splits.json")
    parser.add_argument("--images", required=True, help="the folder holding <split>/<pid>/<image> (ScienceQA's images/)")
    parser.add_argument("--format", nargs="+", default=["QCM-LEA"], metavar="FORMAT",
                        help="INPUT-OUTPUT prompt format(s), default QCM-LEA (the LLaVA paper's); inputs: "
                             f"{', '.join(INPUT_FORMATS)}; outputs: {', '.join(OUTPUT_FORMATS)}; {EVAL_FORMAT} is LLaVA-1.5's "
                             "question layout (its eval.zip's llava_test_CQM-A.json), always written for the test split")
    parser.add_argument("--split", nargs="+", default=None, metavar="SPLIT",
                        help="convert only these splits (default: every split of pid_splits.json)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    for fmt in args.format:
        try:
            check_format(fmt)
        except ValueError as e:
            parser.error(f"--format: {e}")
    if not Path(args.images).is_dir():
        parser.error(f"--images {args.images}: not a directory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = convert(Path(args.problems), Path(args.splits), Path(args.images), args.format, Path(args.out),
                         splits=args.split, show_progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = result["skipped"]
    print(f"converted {result['converted']} problems into {len(result['written'])} files under {args.out}; "
          f"skipped {len(skipped)}" + (f" (listed in {Path(args.out) / 'scienceqa_skipped.json'})" if skipped else ""))
    if result["converted"] == 0:
        print("error: no problem converted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
