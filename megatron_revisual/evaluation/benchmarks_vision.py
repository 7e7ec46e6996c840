"""The multimodal benchmarks: one function per benchmark from a raw row to a `Sample`, and its
`BenchmarkSpec` (where its files are, its Hub copy, the source of its field names).

Prompt formats (the system prompt, the ReVisual-R1 template of the paper's Figure 5, comes
separately). The released evaluation tool, github.com/CSfufu/Revisual-R1 eval/src/utils/
data_loaders.py (HEAD 802f5c2), has loaders for MathVerse and MathVision only; geo3k, wemath and
mathvista are named in its --datasets help text but not implemented there. Their formats below
are the ones of a public loader with the same five benchmarks and --dataset-dir layout (found in
a code index, repository not identified): NOT the released tool's, which has none.

    geo3k       the annotated problem text (InterGPS ``annotat_text``; hiyouga/geometry3k's
                ``problem`` less its "<image>"), graded against the value of the correct choice
    wemath      "{question}\\n\\nOptions: {option}"
    mathvista   the dataset's ``query`` (its hint asks for the option letter); the GitHub
                release keeps it in data/query.json, the Hub copy in a column
    mathverse   ``query_cot`` (released tool: load_mathverse_dataset); a multi-choice row's
                options are read from the lines after its "Choices:" (or "Choice:") line, since
                the dataset has no choices field; a "choose 2" gold ("C\\nD") is graded as a set
    mathvision  the option-letter instruction + "Question: " + question + "Choices:" + lettered
                options, for every row, free-form ones (no options) included: the released
                tool's build_mathvision_prompt
    dynamath    "## Question\\n" + question, plus "Please answer in a floating-point number."
                for float answers: DynaMath's evaluation/opensource_json_eval.py, without its
                JSON answer guide (the ReVisual template asks for \\boxed{} instead)
    logicvista  the question as it is (LogicVista's eval/ passes it unchanged; the options are
                in the image or the question)

Grading rules beyond the released tool's (`grading.grade_response`): DynaMath floats within
0.001 of the truth, text answers by containment, choices by letter (opensource_json_eval.py);
LogicVista by the set of chosen letters, which must equal the truth's (eval/extract_accuracy.py:
"B, D" split, lower-cased, sorted, compared). DynaMath's paper metric is the worst case over a
seed question's variants (`metrics.dynamath_metrics`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from megatron_revisual.evaluation.grading import (
    OPTION_LETTERS,
    option_letter,
    parse_choice_lines,
    parse_inline_options,
)
from megatron_revisual.evaluation.samples import (
    BenchmarkSpec,
    DatasetFormatError,
    RawRow,
    Sample,
    required_field,
    resolve_image,
    row_location,
)

__all__ = ["VISION_SPECS", "dynamath_prompt", "mathvision_prompt"]

_LETTER_LIST = re.compile(r"[A-H](?:\s*[,\n]\s*[A-H])+")  # MathVerse's "C\nD" (choose 2 answers)


def _geo3k_sample(raw: RawRow) -> Sample:
    row, bases = raw.data, raw.bases
    if "problem" in row:  # hiyouga/geometry3k: images, problem, answer (+ id, choices, ground_truth)
        where = row_location(raw)
        return Sample(
            dataset="geo3k",
            id=str(row.get("id", raw.index)),
            prompt=str(required_field(row, "problem", where)).replace("<image>", "").strip(),
            answer=str(required_field(row, "answer", where)),
            multiple_choice=False,
            image=resolve_image(required_field(row, "images", where), bases, where),
        )
    where = row_location(raw, row.get("id"))
    choices = required_field(row, "choices", where)
    letter = str(required_field(row, "answer", where)).strip()
    if letter not in OPTION_LETTERS[: len(choices)]:
        raise DatasetFormatError(f"{where}: answer {letter!r} is not one of the {len(choices)} choices")
    question = row.get("annotat_text") or required_field(row, "problem_text", where)
    return Sample(
        dataset="geo3k",
        id=str(required_field(row, "id", where)),
        prompt=str(question),
        answer=str(choices[OPTION_LETTERS.index(letter)]),
        multiple_choice=False,
        image=resolve_image(row.get("image", "img_diagram.png"), bases, where),
        subsets=tuple(row.get("problem_type_goal") or ()),
    )


def _wemath_step_kind(key: str) -> str:
    if key.endswith("_multi"):
        return "two-step" if key.startswith("2steps") else "three-step"
    return "one-step"


def _wemath_sample(raw: RawRow) -> Sample:
    row = raw.data
    where = row_location(raw, row.get("ID"))
    key = str(required_field(row, "key", where))
    option = str(required_field(row, "option", where))
    return Sample(
        dataset="wemath",
        id=f"{required_field(row, 'ID', where)}@{key}",
        prompt=f"{required_field(row, 'question', where)}\n\nOptions: {option}",
        answer=str(required_field(row, "answer", where)).strip(),
        multiple_choice=True,
        image=resolve_image(required_field(row, "image_path", where), raw.bases, where),
        choices=parse_inline_options(option),
        subsets=(_wemath_step_kind(key),),
        group=str(row["ID"]),
        step=key,
    )


def _mathvista_sample(raw: RawRow) -> Sample:
    row = raw.data
    where = row_location(raw, row.get("pid"))
    answer = str(required_field(row, "answer", where))
    choices = tuple(str(c) for c in (row.get("choices") or ()))
    multiple_choice = row.get("question_type") == "multi_choice"
    if multiple_choice:
        if answer not in choices:
            raise DatasetFormatError(f"{where}: answer {answer!r} is not among choices {choices}")
        answer = OPTION_LETTERS[choices.index(answer)]
    precision = row.get("precision")
    image = row.get("decoded_image") or required_field(row, "image", where)
    task = (row.get("metadata") or {}).get("task")
    query = row.get("query")
    if not query:  # the question alone would drop the hint and the lettered choices
        raise DatasetFormatError(
            f"{where}: no 'query' (the prompt); MathVista's GitHub release keeps it in "
            "data/query.json ({pid: query}), read from beside testmini.json"
        )
    return Sample(
        dataset="mathvista",
        id=str(required_field(row, "pid", where)),
        prompt=str(query),
        answer=answer,
        multiple_choice=multiple_choice,
        image=resolve_image(image, raw.bases, where),
        choices=choices,
        subsets=(task,) if task else (),
        precision=int(precision) if row.get("answer_type") == "float" and precision else None,
    )


def _mathverse_sample(raw: RawRow) -> Sample:
    row = raw.data
    where = row_location(raw, row.get("sample_index"))
    version = row.get("problem_version")
    prompt = str(required_field(row, "query_cot", where))
    multiple_choice = row.get("question_type") == "multi-choice"
    answer = str(required_field(row, "answer", where)).strip()
    # No choices field: the options are lines of the question text ("Choices:\nA:40°\n...");
    # Vision-only rows have them in the image, and are graded by the letter alone.
    choices = parse_choice_lines(str(row.get("question") or prompt)) if multiple_choice else ()
    grading = "default"
    if multiple_choice and _LETTER_LIST.fullmatch(answer):  # "Choose 2 answers": gold "C\nD"
        answer, multiple_choice, grading = ", ".join(re.findall("[A-H]", answer)), False, "letter_set"
    elif multiple_choice:  # the gold as a letter ("(B)", or an option's text, would never match)
        answer = option_letter(answer, choices) or answer
    return Sample(
        dataset="mathverse",
        id=str(required_field(row, "sample_index", where)),
        prompt=prompt,
        answer=answer,
        multiple_choice=multiple_choice,
        image=resolve_image(required_field(row, "image", where), raw.bases, where),
        choices=choices,
        subsets=(version,) if version else (),
        grading=grading,
    )


def mathvision_prompt(question: str, options: Iterable[str]) -> str:
    """MathVision's prompt as the released tool builds it (build_mathvision_prompt): the
    option-letter instruction, the question and the lettered options, an empty "Choices:" list
    for a free-form row included."""
    lines = [
        "Please first conduct reasoning, and then answer the question and provide the correct "
        "option letter, e.g., A, B, C, D, at the end.",
        f"Question: {question}",
        "Choices:",
    ]
    lines += [f"{OPTION_LETTERS[i]}: {option}" for i, option in enumerate(options)]
    return "\n".join(lines) + "\n"


def _mathvision_sample(raw: RawRow) -> Sample:
    row = raw.data
    where = row_location(raw, row.get("id"))
    options = [str(o) for o in (row.get("options") or ())]
    image = row.get("decoded_image") or required_field(row, "image", where)
    subject = row.get("subject")
    return Sample(
        dataset="mathvision",
        id=str(required_field(row, "id", where)),
        prompt=mathvision_prompt(str(required_field(row, "question", where)), options),
        answer=str(required_field(row, "answer", where)).strip(),
        multiple_choice=bool(options),
        image=resolve_image(image, raw.bases, where),
        choices=tuple(options),
        subsets=(subject,) if subject else (),
    )


def dynamath_prompt(question: str, answer_type: str) -> str:
    """DynaMath's question text (evaluation/opensource_json_eval.py), its JSON guide left out."""
    text = "## Question\n" + question
    return text + "Please answer in a floating-point number." if answer_type == "float" else text


def _dynamath_variant(part: str) -> str:
    """"variant3" from a Hub split ("sample_variant3") or a file ("sample3-00000-of-00001")."""
    match = re.search(r"sample(?:_variant)?(\d+)", part)
    return f"variant{match.group(1)}" if match else part or "variant1"


def _dynamath_sample(raw: RawRow) -> Sample:
    row = raw.data
    where = row_location(raw, row.get("id"))
    seed = str(required_field(row, "id", where))
    kind = str(required_field(row, "answer_type", where))
    variant = _dynamath_variant(raw.part)
    subject = row.get("subject")
    return Sample(
        dataset="dynamath",
        id=f"{seed}@{variant}",
        prompt=dynamath_prompt(str(required_field(row, "question", where)), kind),
        answer=str(required_field(row, "ground_truth", where)).strip(),
        multiple_choice=kind == "multiple choice",
        image=resolve_image(row.get("decoded_image") or required_field(row, "image", where), raw.bases, where),
        subsets=(" ".join(str(subject).split()),) if subject else (),  # "analytic     geometry"
        group=seed,
        grading={"float": "dynamath_float", "multiple choice": "default"}.get(kind, "dynamath_text"),
    )


def _logicvista_sample(raw: RawRow) -> Sample | None:
    row = raw.data
    where = row_location(raw, row.get("id"))
    if not str(row.get("answer") or "").strip():
        return None  # dataset.json's v1_382 has neither question nor answer
    return Sample(
        dataset="logicvista",
        id=str(required_field(row, "id", where)),
        prompt=str(required_field(row, "question", where)),
        answer=str(required_field(row, "answer", where)).strip(),
        multiple_choice=False,  # a set of letters ("B, D"), graded by `letter_set`
        image=resolve_image(required_field(row, "imagename", where), raw.bases, where),
        subsets=tuple(row.get("skill") or ()),
        grading="letter_set",
    )


VISION_SPECS: tuple[BenchmarkSpec, ...] = (
    BenchmarkSpec(
        name="geo3k", title="Geo3K", subdir="geometry3k", local_files=(), image_dirs=(),
        parquet_glob="**/test*.parquet", hub=("hiyouga/geometry3k", ((None, "test"),)),
        to_sample=_geo3k_sample,
        schema="https://huggingface.co/datasets/hiyouga/geometry3k/blob/main/README.md (features images "
        "[sequence of image], problem, answer, id [int64], choices [sequence of string], ground_truth; "
        "splits train 2101 / validation 300 / test 601; its conversion script: problem = '<image>' + "
        "annotat_text, answer = choices[letter]); InterGPS test/<n>/data.json + img_diagram.png "
        "(annotat_text, choices, answer letter, as that script reads them). Unconfirmed: what "
        "ground_truth holds (not read), the other data.json fields (id, problem_type_goal)",
    ),
    BenchmarkSpec(
        name="wemath", title="WeMath", subdir="wemath", local_files=("testmini.json",),
        image_dirs=("", "images"), parquet_glob="**/testmini*.parquet",
        hub=("We-Math/We-Math", ((None, "testmini"),)), to_sample=_wemath_sample,
        schema="github.com/We-Math/We-Math data/testmini.json (read: 1740 rows; ID, split, knowledge "
        "concept, question, option [one string 'A. ..;B. ..; E. No correct answer'], answer [letter], "
        "image_path ['2steps/image/1-1.png', relative to data/], key [2steps_1 .. 3steps_multi], "
        "question number [int], knowledge concept description). Unconfirmed: the columns of the Hub's "
        "data/testmini-00000-of-00001-*.parquet (https://huggingface.co/datasets/We-Math/We-Math/tree/"
        "main/data; read here with image_path as an image) and the folder its testmini.zip unpacks to",
    ),
    BenchmarkSpec(
        name="mathvista", title="MathVista", subdir="mathvista", local_files=("testmini.json",),
        image_dirs=("",), key_field="pid", side_files=(("query.json", "query"),),
        parquet_glob="**/testmini*.parquet", hub=("AI4Math/MathVista", ((None, "testmini"),)),
        to_sample=_mathvista_sample,
        schema="github.com/lupantech/MathVista data/testmini.json (read: {pid: row}, 1000 rows; "
        "question, image 'images/<pid>.jpg', choices [list or null], unit, precision [int or null], "
        "answer [the choice's text], question_type multi_choice|free_form, answer_type "
        "text|integer|float|list, pid, metadata; no query) + data/query.json ({pid: query}); "
        "https://huggingface.co/datasets/AI4Math/MathVista/blob/d32e834bdd9442cf2a0f72e3b2b7a74151c2a2d1/"
        "README.md (pid, question, image, decoded_image [image], choices, unit, precision [float64], "
        "answer, question_type, answer_type, metadata, query; splits testmini 1000 / test 5141)",
    ),
    BenchmarkSpec(
        name="mathverse", title="MathVerse", subdir="mathverse", local_files=("testmini.json",),
        image_dirs=("images", ""), parquet_glob="**/testmini.parquet",
        hub=("AI4Math/MathVerse", (("testmini", "testmini"),)), to_sample=_mathverse_sample,
        schema="github.com/ZrrSkywalker/MathVerse README + data/testmini_text_only.json (read: "
        "sample_index, problem_index, problem_version, question [multi-choice: options after a "
        "'Choices:' line as 'A:40°', in 4 of 436 rows after 'Choice:' as 'A. True'], image, answer "
        "[a letter, '(C)', an option's text, or 'C\\nD'], question_type multi-choice|free-form, "
        "metadata {split, source, subject, subfield}, query_wo, query_cot) + output_templates/"
        "output_testmini.json (the five versions; Vision Only rows have question ''); Hub configs "
        "testmini (3940 rows, testmini.parquet) and testmini_text_only (788), each with split testmini "
        "(https://huggingface.co/datasets/AI4Math/MathVerse/viewer); question_for_eval added on the "
        "Hub (commit 96641f2, not read). Unconfirmed: the exact query_cot of Vision Only multi-choice "
        "rows; testmini.json itself (over 4 MiB, not in the snapshot read)",
    ),
    BenchmarkSpec(
        name="mathvision", title="MathVision", subdir="mathvision", local_files=("test.jsonl",),
        image_dirs=("",), parquet_glob="**/test-*.parquet",
        hub=("MathLLMs/MathVision", ((None, "test"),)), to_sample=_mathvision_sample,
        schema="github.com/mathllm/MATH-V data/test.jsonl (read: 3040 rows; id [string], question "
        "[with '<image1>'], options [list: 5 letters or texts, or empty for free-form], answer [a "
        "letter, or the value], solution, level [int], subject, image 'images/<id>.jpg'); "
        "https://huggingface.co/datasets/MathLLMs/MathVision/commit/b45d19fa55a9ba38c33426e96e754267a0189e8c "
        "(id, question, options, image, decoded_image [image], answer, solution, level, subject; "
        "splits test 3040 / testmini 304)",
    ),
    BenchmarkSpec(
        name="dynamath", title="DynaMath", subdir="dynamath", local_files=(), image_dirs=("",),
        parquet_glob="**/sample*.parquet",
        hub=("DynaMath/DynaMath_Sample", tuple((None, f"sample_variant{v}") for v in range(1, 11))),
        to_sample=_dynamath_sample,
        schema="https://huggingface.co/datasets/DynaMath/DynaMath_Sample (README features: id, "
        "question, image, decoded_image, ground_truth, answer_type, subject, knowledge_level; "
        "splits sample_variant1..10, files data/sample<k>-*.parquet)",
    ),
    BenchmarkSpec(
        name="logicvista", title="LogicVista", subdir="logicvista", local_files=("dataset.json",),
        image_dirs=("images",), key_field="id", parquet_glob=None, hub=None, to_sample=_logicvista_sample,
        schema="github.com/Yijia-Xiao/LogicVista data/dataset.json ({'v1_N': {imagename, "
        "question, answer, reasoning, skill, broad_capability, ...}}) + data/images/; no "
        "confirmed Hub copy",
    ),
)
