"""The reasoning-question conventions equal the MediSee reference code.

Read from Edisonhimself/MediSee at commit 5b2cd5d74b76b7c3cdac64ef0c1fad8000dc7008:
`utils/utils.py` (MED_SEG_QUESTION_LIST_4_SEGPLUSBOX, the answer lists), `utils/reasoning_med_seg.py`
(training rows lower-case the query and the explanation), `utils/seg_med_2d_dataset.py` (training
rows lower-case the class name) and `utils/dataset.py`
(`ValDataset_Reasoning_Med_Seg_with_explanation_long`: one fixed suffix, the text as written;
`ValDataset_SAMed2D_default`: one referring question, the class text as written, the answer
"[SEG] and [BBOX].").
"""

import hashlib
import json

import numpy as np
import pytest

from medisee.config import PrepareConfig
from medisee.data import phantom, prompts
from medisee.data.records import LoadedImage, LoadedTarget, record_id, rows_for_image
from tests.data.layouts import mlmr_sd_layout

# The six request suffixes of the reference, in its order (after "{med_prompt} ").
REFERENCE_SUFFIXES = [
    "Please respond with segmentation mask and location bounding box, and explain the reason.",
    "Please output segmentation mask and location bounding box, and explain the reason.",
    "Please output segmentation mask and location bounding box, and explain why.",
    "Please respond with segmentation mask and location bounding box, and explain why.",
    "Please respond with segmentation mask and location bounding box, and give some explanation.",
    "Please output segmentation mask and location bounding box, and give some explanation.",
]
REFERENCE_VALIDATION_SUFFIX = "Please output segmentation mask and location bounding box, and explain why."
# The reference's four referring questions, in its order, and the one its validation dataset asks.
REFERENCE_REFERRING = [
    "Can you segment and locate the {} in this image?",
    "Please segment and locate the {} in this image.",
    "What is {} in this image? Please respond with segmentation mask and location bounding box.",
    "What is {} in this image? Please output segmentation mask and location bounding box.",
]
REFERENCE_VALIDATION_REFERRING = "Please segment and locate the {} in this image."
REFERENCE_FIXED_ANSWER = "[SEG] and [BBOX]."
KEYS = [f"src/img{i}/liver/000/reasoning_long" for i in range(80)]


def test_the_suffixes_are_exactly_the_references_six():
    assert list(prompts.REASONING_SUFFIXES) == REFERENCE_SUFFIXES
    assert prompts.EVAL_REASONING_SUFFIX == REFERENCE_VALIDATION_SUFFIX


def test_training_rows_draw_every_suffix_and_only_those():
    seen = {prompts.reasoning("Which organ makes bile?", None, key)[0].split("? ", 1)[1] for key in KEYS}
    assert seen == set(REFERENCE_SUFFIXES)


def test_evaluation_rows_always_use_the_validation_suffix_and_keep_the_case():
    for key in KEYS:
        question, _ = prompts.reasoning("  Which organ makes bile? ", "It makes bile.", key, for_eval=True)
        assert question == "Which organ makes bile? " + REFERENCE_VALIDATION_SUFFIX


def test_training_rows_lower_case_the_query_and_the_explanation():
    for key in KEYS:
        question, answer = prompts.reasoning("Which organ is the Liver?", "The Liver makes bile.", key)
        assert question.startswith("which organ is the liver? ")
        assert answer.endswith("the liver makes bile.") and "Liver" not in answer


@pytest.mark.parametrize("for_eval", [False, True])
def test_the_reasoning_answer_puts_the_tokens_first(for_eval):
    forms = set()
    for key in KEYS:
        _, answer = prompts.reasoning("Q?", "because bile.", key, for_eval=for_eval)
        tokens, explanation = answer.split("[BBOX]. ", 1)
        assert "[SEG]" in tokens and "[SEG]" not in explanation and explanation == "because bile."
        forms.add(tokens)
    assert len(forms) == len(prompts.REASONING_ANSWERS)


def test_class_names_are_lower_cased_in_referring_and_false_questions():
    for key in KEYS:
        question, _ = prompts.referring("Liver", key)
        assert question in [q.format(name="liver") for q in prompts.REFERRING_QUERIES]
        question, answer = prompts.false_query("Inferior_Vena_Cava", key)
        assert question in [q.format(name="inferior vena cava") for q in prompts.REFERRING_QUERIES]
        assert answer == "There is no inferior vena cava in this image."
    assert prompts.class_text("Inferior_Vena_Cava") == "Inferior Vena Cava"  # the row's label keeps its case


def _mlmr_questions(base, val_fraction: float) -> dict[str, list[str]]:
    """Reasoning questions of the MLMR-SD converter by split."""
    from medisee.data.sources import mlmr_sd
    from medisee.data.sources.context import ConvertContext
    from medisee.storage import StorageSettings

    prepare = PrepareConfig(val_fraction=val_fraction, false_queries_per_image=0)
    ctx = ConvertContext(settings=StorageSettings(), prepare=prepare, source="mlmr-sd")
    out: dict[str, list[str]] = {}
    for spec in mlmr_sd.specs(str(base), ctx):
        for target in spec["targets"]:
            out.setdefault(spec["split"], []).extend(q["text"] for q in target["queries"] or [])
    return out


def test_mlmr_sd_training_rows_are_lower_cased_with_a_drawn_suffix(tmp_path):
    train = _mlmr_questions(mlmr_sd_layout(tmp_path), 0.0)["train"]
    assert len(train) == 4  # a long and a short query for each of the two classes
    for question in train:
        query, suffix = question.split("? ", 1)
        assert (
            query == query.lower() and query.startswith(("long ", "short ")) and suffix in REFERENCE_SUFFIXES
        )


def test_mlmr_sd_val_and_test_rows_use_the_validation_suffix(tmp_path):
    base = mlmr_sd_layout(tmp_path)
    questions = _mlmr_questions(base, 0.99)
    assert set(questions) == {"val", "test"}
    pool = json.loads((base / "prompts.json").read_text())
    written = {q for entry in pool.values() for n in ("long", "short") for q in entry[n]}
    assert len(questions["val"]) == 4
    for question in questions["val"]:
        query, suffix = question.split("? ", 1)
        assert query + "?" in written and suffix == REFERENCE_VALIDATION_SUFFIX
    lines = [json.loads(line) for line in (base / "test.jsonl").read_text().splitlines()]
    assert sorted(questions["test"]) == sorted(
        f"{line[n]} {REFERENCE_VALIDATION_SUFFIX}" for line in lines for n in ("long", "short")
    )


def _drawn(options: list[str], key: str) -> str:
    """The option a training row draws: blake2b-64 of the key, little-endian, modulo the count."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return options[int.from_bytes(digest, "little") % len(options)]


def test_eval_referring_rows_ask_the_validation_question_with_the_fixed_answer():
    for key in KEYS:
        assert prompts.referring("Liver", key, for_eval=True) == (
            REFERENCE_VALIDATION_REFERRING.format("Liver"),  # the class text as written
            REFERENCE_FIXED_ANSWER,
        )
        question, answer = prompts.false_query("Inferior_Vena_Cava", key, for_eval=True)
        assert question == REFERENCE_VALIDATION_REFERRING.format("Inferior Vena Cava")
        assert answer == "There is no Inferior Vena Cava in this image."
    assert prompts.EVAL_REFERRING_QUERY.format(name="{}") == REFERENCE_VALIDATION_REFERRING


def test_training_referring_rows_still_draw_a_question_and_an_answer():
    questions = set()
    for key in KEYS:
        question, answer = prompts.referring("Liver", key)
        assert question == _drawn(REFERENCE_REFERRING, key + "/q").format("liver")
        assert answer == _drawn(list(prompts.ANSWERS), key + "/a")
        questions.add(question)
    assert len(questions) == len(REFERENCE_REFERRING)


def _image(split: str) -> LoadedImage:
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:6] = True
    return LoadedImage(
        "k", "ref", "ct", split, np.zeros((8, 8, 3), np.uint8), [LoadedTarget("Liver", mask, "m")], ["Kidney"]
    )


@pytest.mark.parametrize("split", ["val", "test"])
def test_val_and_test_records_use_the_validation_referring_question(split):
    by_kind = {r["query_kind"]: r for r in rows_for_image("src", _image(split))}
    assert (by_kind["referring"]["query"], by_kind["referring"]["answer"]) == (
        "Please segment and locate the Liver in this image.",
        "[SEG] and [BBOX].",
    )
    assert by_kind["false_query"]["query"] == "Please segment and locate the Kidney in this image."
    assert by_kind["false_query"]["answer"] == "There is no Kidney in this image."


def test_train_records_keep_the_drawn_referring_question():
    by_kind = {r["query_kind"]: r for r in rows_for_image("src", _image("train"))}
    key = record_id("src", "k", "Liver", 0, "referring")
    assert by_kind["referring"]["query"] == _drawn(REFERENCE_REFERRING, key + "/q").format("liver")
    assert by_kind["referring"]["answer"] == _drawn(list(prompts.ANSWERS), key + "/a")
    false_key = record_id("src", "k", "Kidney", "absent", "false_query")
    assert by_kind["false_query"]["query"] == _drawn(REFERENCE_REFERRING, false_key + "/q").format("kidney")


def _phantom_queries(val_fraction: float) -> dict[str, list]:
    """(image key, class name, query) of the phantom converter's targets, by split."""
    from medisee.data.sources import phantom_source
    from medisee.data.sources.context import ConvertContext
    from medisee.storage import StorageSettings

    prepare = PrepareConfig(phantom_images=12, phantom_size=64, val_fraction=val_fraction)
    ctx = ConvertContext(settings=StorageSettings(), prepare=prepare, source="phantom")
    out: dict[str, list] = {}
    for spec in phantom_source.specs("-", ctx):
        for loaded in phantom_source.load(spec, ctx):
            for target in loaded.targets:
                out.setdefault(loaded.split, []).extend(
                    (loaded.image_key, target.class_name, q) for q in target.queries
                )
    return out


def test_phantom_val_rows_use_the_evaluation_forms():
    val = _phantom_queries(0.99)["val"]
    assert val
    organ_texts = {text for o in phantom.ORGANS for text in (o.short, o.long)}
    reasoning = 0
    for _, name, query in val:
        if query.kind == "referring":
            assert (query.text, query.answer) == (
                REFERENCE_VALIDATION_REFERRING.format(name),
                REFERENCE_FIXED_ANSWER,
            )
            continue
        reasoning += 1
        asked = query.text.removesuffix(" " + REFERENCE_VALIDATION_SUFFIX)
        assert asked != query.text  # the validation suffix, and the query as written
        assert (
            asked in organ_texts or asked.startswith("Which structure") or asked.startswith("Which labelled")
        )
        assert query.answer.split("[BBOX]. ", 1)[1] == query.explanation  # the explanation keeps its case
    assert reasoning == len(val) / 2


def test_phantom_train_rows_are_unchanged():
    train = _phantom_queries(0.0)["train"]
    assert train
    for image_key, name, query in train:
        if query.kind == "referring":
            key = f"{image_key}/{name}"
            assert query.text == _drawn(REFERENCE_REFERRING, key + "/q").format(name)
            assert query.answer == _drawn(list(prompts.ANSWERS), key + "/a")
        else:
            asked, suffix = query.text.split("? ", 1)
            assert asked == asked.lower() and suffix in REFERENCE_SUFFIXES
