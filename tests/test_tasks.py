"""GLUE/SuperGLUE readers: tiny fixtures in the original formats, errors, and the staged real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.errors import ConfigurationError
from datamodules.tasks.registry import get_task, suite_tasks
from datamodules.tasks.spec import Example, MissingTaskData, report_name

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOM = "\ufeff"


def write(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8, as given: BOM, CRLF and trailing newline included) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def jsonl(*records: dict, bom: bool = False) -> str:
    """JSON-lines text of ``records`` with a trailing blank line."""
    return (BOM if bom else "") + "".join(json.dumps(record) + "\n" for record in records) + "\n"


def read(root: Path, suite: str, name: str, split: str) -> list[Example]:
    """Read one split of a task from ``root/<suite>/<Directory>``."""
    spec = get_task(suite, name)
    return spec.reader(root / suite / spec.directory, split)


def model_text(example: Example) -> str:
    """Everything a model sees of an example, joined."""
    return " ".join([*example.segments, *(text for candidate in example.candidates for text in candidate)])


def test_registry_specs():
    glue = {spec.name: spec for spec in suite_tasks("glue")}
    superglue = {spec.name: spec for spec in suite_tasks("superglue")}
    assert list(glue)[:10] == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax"]
    assert list(superglue)[:10] == ["boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc", "axb", "axg"]
    assert glue["stsb"].kind == "regression" and glue["stsb"].label_names == ()
    assert {spec.kind for name, spec in glue.items() if name != "stsb"} == {"classification"}
    assert superglue["copa"].kind == superglue["record"].kind == "multiple_choice"
    assert glue["mnli"].label_names == glue["ax"].label_names == ("entailment", "neutral", "contradiction")
    assert [report_name(glue["mnli"], split) for split in glue["mnli"].dev_splits] == ["mnli-m", "mnli-mm"]
    assert report_name(glue["ax"], "diagnostic-full") == "ax"
    assert (glue["ax"].parent, superglue["axb"].parent, superglue["axg"].parent) == ("mnli", "rte", "rte")
    assert glue["mrpc"].metrics == ("f1", "accuracy") and glue["cola"].metrics == ("matthews",)
    assert superglue["multirc"].metrics == ("f1", "exact_match") and superglue["cb"].metrics == ("accuracy", "f1")
    assert superglue["axb"].metrics == ("matthews",) and superglue["axg"].metrics == ("accuracy",)
    assert [spec.submission_name for spec in glue.values()] == [
        "CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI.tsv", "QNLI.tsv", "RTE.tsv", "WNLI.tsv",
        "AX.tsv"]
    assert [spec.submission_name for spec in superglue.values()] == [
        f"{spec.directory}.jsonl" for spec in superglue.values()]
    assert superglue["axb"].submission_name == "AX-b.jsonl" and superglue["wsc"].hub == ("super_glue", "wsc.fixed")
    assert glue["sst2"].hub == ("glue", "sst2") and superglue["boolq"].hub == ("super_glue", "boolq")


def tsv(*rows: str, end: str = "\n") -> str:
    """TSV text: each row's fields are separated by ``|`` here, by tabs in the file."""
    return "".join(row.replace("|", "\t") + end for row in rows)


STSB_HEADER = "index|genre|filename|year|old_index|source1|source2|sentence1|sentence2"
MNLI_HEADER = "index|promptID|pairID|genre|sentence1_binary_parse|sentence2_binary_parse|sentence1_parse|" \
              "sentence2_parse|sentence1|sentence2"
GLUE_FIXTURES = {
    # CoLA train/dev: no header; train ends with a blank line, dev has no final newline.
    "CoLA/train.tsv": tsv('gj04|1||The "big" dog barked.', "gj04|0|*|Barked dog the.") + "\n",
    "CoLA/dev.tsv": "gj04\t1\t\tShe left.",
    "CoLA/test.tsv": tsv("index|sentence", "0|Bill whistled ."),
    "SST-2/train.tsv": tsv("sentence|label", 'it \'s a " charming " film |1'),
    "SST-2/test.tsv": tsv("index|sentence", "7|uneasy mishmash ."),
    "MRPC/train.tsv": BOM + tsv("Quality|#1 ID|#2 ID|#1 String|#2 String",
                                '0|11|12|He said " no .|" Yes , " she said .'),
    "MRPC/test.tsv": tsv("index|#1 ID|#2 ID|#1 String|#2 String", "3|1|2|A b .|C d ."),
    "STS-B/train.tsv": tsv(STSB_HEADER + "|score",
                           "5|main-captions|MSRvid|2012test|0001|none|none|A plane takes off.|A jet departs.|4.250"),
    "STS-B/test.tsv": tsv(STSB_HEADER, "0|main-news|MSRpar|2012test|0024|none|none|A girl styles.|A girl brushes."),
    "QQP/train.tsv": tsv("id|qid1|qid2|question1|question2|is_duplicate",
                         '402555|536040|536041|How do I "fix" it?|Why is it broken?|1'),
    "QQP/test.tsv": tsv("id|question1|question2", "0|What?|Why?"),
    "MNLI/train.tsv": tsv(MNLI_HEADER + "|label1|gold_label",
                          "0|31193|31193n|government|( ( A b ) )|( C )|(ROOT (S A b))|(ROOT C)|A b.|C.|neutral|"
                          "neutral"),
    "MNLI/dev_mismatched.tsv": tsv(MNLI_HEADER + "|label1|label2|label3|label4|label5|gold_label",
                                   "9|1|1e|letters|x|y|x|y|Your gift helps.|It helps.|entailment|entailment|"
                                   "entailment|neutral|entailment|entailment"),
    "MNLI/test_matched.tsv": tsv(MNLI_HEADER, "4|1|1|slate|x|y|x|y|Hi.|Bye."),
    "QNLI/dev.tsv": tsv("index|question|sentence|label", '0|What came?|The "new" law came.|not_entailment'),
    "RTE/train.tsv": tsv("index|sentence1|sentence2|label", "0|No arms found.|Arms found.|not_entailment",
                         "1|A pope died.|A pope died.|entailment"),
    "WNLI/dev.tsv": tsv("index|sentence1|sentence2|label", "0|The drain is clogged.|The hair is.|0"),
    "diagnostic/diagnostic-full.tsv": tsv(
        "Lexical Semantics|Predicate-Argument Structure|Logic|Knowledge|Domain|Premise|Hypothesis|Label",
        "||Negation||Artificial|The cat sat.|The cat did not sit.|contradiction", end="\r\n"),
    "diagnostic/diagnostic.tsv": "index\tsentence1\tsentence2\n0\tThe cat sat.\tThe cat did not sit.",
}

GLUE_EXPECTED = [
    ("cola", "train", [(0, ('The "big" dog barked.',), 1), (1, ("Barked dog the.",), 0)]),
    ("cola", "dev", [(0, ("She left.",), 1)]),
    ("cola", "test", [(0, ("Bill whistled .",), None)]),
    ("sst2", "train", [(0, ('it \'s a " charming " film ',), 1)]),
    ("sst2", "test", [(7, ("uneasy mishmash .",), None)]),
    ("mrpc", "train", [(0, ('He said " no .', '" Yes , " she said .'), 0)]),
    ("mrpc", "test", [(3, ("A b .", "C d ."), None)]),
    ("stsb", "train", [(5, ("A plane takes off.", "A jet departs."), 4.25)]),
    ("stsb", "test", [(0, ("A girl styles.", "A girl brushes."), None)]),
    ("qqp", "train", [(402555, ('How do I "fix" it?', "Why is it broken?"), 1)]),
    ("qqp", "test", [(0, ("What?", "Why?"), None)]),
    ("mnli", "train", [(0, ("A b.", "C."), 1)]),
    ("mnli", "dev_mismatched", [(9, ("Your gift helps.", "It helps."), 0)]),
    ("mnli", "test_matched", [(4, ("Hi.", "Bye."), None)]),
    ("qnli", "dev", [(0, ("What came?", 'The "new" law came.'), 1)]),
    ("rte", "train", [(0, ("No arms found.", "Arms found."), 1), (1, ("A pope died.", "A pope died."), 0)]),
    ("wnli", "dev", [(0, ("The drain is clogged.", "The hair is."), 0)]),
    ("ax", "diagnostic-full", [(0, ("The cat sat.", "The cat did not sit."), 2)]),
    ("ax", "diagnostic", [(0, ("The cat sat.", "The cat did not sit."), None)]),
]


@pytest.fixture
def glue_root(tmp_path) -> Path:
    for name, text in GLUE_FIXTURES.items():
        write(tmp_path / "glue" / name, text)
    return tmp_path


@pytest.mark.parametrize(("name", "split", "expected"), GLUE_EXPECTED, ids=[f"{n}-{s}" for n, s, _ in GLUE_EXPECTED])
def test_glue_reader(glue_root, name, split, expected):
    examples = read(glue_root, "glue", name, split)
    assert [(e.idx, e.segments, e.label) for e in examples] == expected


SUPERGLUE_FIXTURES = {
    "BoolQ/val.jsonl": jsonl({"question": "is it wet", "passage": "Water -- it is wet.", "idx": 0, "label": True},
                             {"question": "is it dry", "passage": "Sand -- dry.", "idx": 1, "label": "false"},
                             bom=True),
    "CB/train.jsonl": jsonl({"premise": "He left.", "hypothesis": "he went", "label": "neutral", "idx": 3}),
    "COPA/val.jsonl": jsonl(
        {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
         "label": 0, "idx": 0},
        {"premise": "I ate.", "choice1": "I was full.", "choice2": "I was hungry.", "question": "effect",
         "label": 1, "idx": 1}),
    "COPA/test.jsonl": jsonl(
        {"premise": "It broke.", "choice1": "Dropped.", "choice2": "Kept.", "question": "cause", "idx": 0}),
    "MultiRC/val.jsonl": jsonl({"idx": 4, "version": 1.1, "passage": {"text": "Sent one. Sent two.", "questions": [
        {"question": "What is one?", "idx": 7, "answers": [{"text": "A sentence", "idx": 20, "label": 1},
                                                           {"text": "A dog", "idx": 21, "label": 0}]},
        {"question": "How many?", "idx": 8, "answers": [{"text": "Two", "idx": 22, "label": True}]}]}}),
    "ReCoRD/val.jsonl": jsonl({"idx": 0, "source": "Daily mail", "passage": {
        "text": "Obama met Putin in Paris.\n@highlight\nObama visits Paris\n@highlight\nTalks with Putin",
        "entities": [{"start": 0, "end": 4}, {"start": 10, "end": 14}, {"start": 19, "end": 23},
                     {"start": 37, "end": 41}]},
        "qas": [{"query": "@placeholder hosted the talks.", "idx": 5,
                 "answers": [{"start": 19, "end": 23, "text": "Paris"}]}]}),
    "RTE/train.jsonl": jsonl({"premise": "A pope died.", "hypothesis": "A pope is dead.", "label": "entailment",
                              "idx": 0}),
    "WiC/train.jsonl": jsonl({"word": "buy", "sentence1": "FMC has bought 565.", "sentence2": "Buy it now.", "idx": 0,
                              "label": False, "start1": 8, "end1": 14, "start2": 0, "end2": 3, "version": 1.1}),
    "WSC/val.jsonl": jsonl(
        {"text": "Mark told Pete lies about himself . He should have been skeptical.", "idx": 0, "label": False,
         "target": {"span1_index": 0, "span1_text": "Mark", "span2_index": 7, "span2_text": "He"}},
        # span2_index is off by one, as in the staged val.jsonl (idx 42): the span is found next to it.
        {"text": "He put the pebble in the iron safe . Some day they might use it , but not now.", "idx": 1,
         "label": True,
         "target": {"span1_index": 6, "span1_text": "iron safe", "span2_index": 13, "span2_text": "it"}}),
    "WSC/test.jsonl": jsonl({"text": "Emma's mom said she was tired.", "idx": 0, "target": {
        "span1_index": 0, "span1_text": "Emma", "span2_index": 3, "span2_text": "she"}}),
    "AX-b/AX-b.jsonl": jsonl({"sentence1": "The cat sat.", "sentence2": "The cat did not sit.",
                              "label": "not_entailment", "idx": 0}),
    "AX-g/AX-g.jsonl": jsonl({"premise": "The nurse left her bag.", "hypothesis": "The nurse had a bag.",
                              "label": "entailment", "idx": 0, "pair_id": 9}),
}


@pytest.fixture
def superglue_root(tmp_path) -> Path:
    for name, text in SUPERGLUE_FIXTURES.items():
        write(tmp_path / "superglue" / name, text)
    return tmp_path


def test_boolq_cb_rte_axg_pairs(superglue_root):
    boolq = read(superglue_root, "superglue", "boolq", "dev")
    assert [(e.idx, e.segments, e.label) for e in boolq] == [
        (0, ("is it wet", "Water -- it is wet."), 1), (1, ("is it dry", "Sand -- dry."), 0)]
    cb = read(superglue_root, "superglue", "cb", "train")
    assert [(e.idx, e.segments, e.label) for e in cb] == [(3, ("He left.", "he went"), 2)]
    rte = read(superglue_root, "superglue", "rte", "train")
    assert [(e.segments, e.label) for e in rte] == [(("A pope died.", "A pope is dead."), 0)]
    dev, test = (read(superglue_root, "superglue", "axg", split) for split in ("dev", "test"))
    assert dev[0].segments == test[0].segments == ("The nurse left her bag.", "The nurse had a bag.")
    assert (dev[0].label, test[0].label) == (0, None)


def test_copa_question_reaches_the_model(superglue_root):
    cause, effect = read(superglue_root, "superglue", "copa", "dev")
    assert cause.candidates == (("The man fell. What was the cause?", "He slipped."),
                                ("The man fell. What was the cause?", "He sang."))
    assert effect.candidates[1] == ("I ate. What happened as a result?", "I was hungry.")
    assert (cause.label, effect.label, cause.segments) == (0, 1, ())
    assert read(superglue_root, "superglue", "copa", "test")[0].label is None


def test_multirc_one_example_per_answer(superglue_root):
    examples = read(superglue_root, "superglue", "multirc", "dev")
    assert [(e.idx, e.group, e.label) for e in examples] == [
        ({"paragraph": 4, "question": 7, "answer": 20}, (4, 7), 1),
        ({"paragraph": 4, "question": 7, "answer": 21}, (4, 7), 0),
        ({"paragraph": 4, "question": 8, "answer": 22}, (4, 8), 1)]
    assert examples[0].segments == ("Sent one. Sent two.", "What is one? A sentence")
    for example, answer in zip(examples, ("A sentence", "A dog", "Two")):
        assert answer in model_text(example) and "Sent two." in model_text(example)


def test_record_ranks_unique_entities(superglue_root):
    (example,) = read(superglue_root, "superglue", "record", "dev")
    assert example.candidate_texts == ("Obama", "Putin", "Paris")
    assert example.candidates[2] == ("Obama met Putin in Paris. Obama visits Paris. Talks with Putin",
                                     "Paris hosted the talks.")
    assert (example.idx, example.group, example.answers, example.label) == (5, 5, ("Paris",), 2)


def test_wic_word_and_occurrences_marked(superglue_root):
    (example,) = read(superglue_root, "superglue", "wic", "train")
    assert example.segments == ("buy: FMC has *bought* 565.", "*Buy* it now.")
    assert example.label == 0


def test_wsc_spans_marked(superglue_root):
    first, second = read(superglue_root, "superglue", "wsc", "dev")
    assert first.segments == ("*Mark* told Pete lies about himself . #He# should have been skeptical.",
                              'Does "He" refer to "Mark"?')
    assert second.segments[0] == "He put the pebble in the *iron safe* . Some day they might use #it# , but not now."
    assert (first.label, second.label) == (0, 1)
    (test,) = read(superglue_root, "superglue", "wsc", "test")  # a possessive word keeps its mark
    assert test.segments[0].startswith("*Emma's* mom said #she# was") and test.label is None


def test_axb_from_jsonl_or_glue_diagnostic(superglue_root, glue_root):
    (example,) = read(superglue_root, "superglue", "axb", "dev")
    assert (example.segments, example.label) == (("The cat sat.", "The cat did not sit."), 1)
    (superglue_root / "superglue" / "AX-b" / "AX-b.jsonl").unlink()
    # No AX-b.jsonl: built from <data>/glue/diagnostic/diagnostic-full.tsv, contradiction -> not_entailment.
    assert read(superglue_root, "superglue", "axb", "dev") == [example]
    assert read(superglue_root, "superglue", "axb", "test")[0].label is None
    (glue_root / "glue" / "diagnostic" / "diagnostic-full.tsv").unlink()
    with pytest.raises(MissingTaskData):
        read(superglue_root, "superglue", "axb", "dev")


def test_every_field_reaches_the_model(glue_root, superglue_root):
    fields = {("superglue", "boolq", "dev"): ["is it wet", "Water -- it is wet."],
              ("superglue", "cb", "train"): ["He left.", "he went"],
              ("superglue", "copa", "dev"): ["The man fell.", "What was the cause?", "He slipped.", "He sang."],
              ("superglue", "multirc", "dev"): ["Sent one. Sent two.", "What is one?", "A sentence"],
              ("superglue", "record", "dev"): ["Obama met Putin in Paris", "hosted the talks.", "Talks with Putin"],
              ("superglue", "wic", "train"): ["buy", "FMC has *bought* 565.", "*Buy* it now."],
              ("superglue", "wsc", "dev"): ["*Mark*", "#He#", "himself", "Does"],
              ("glue", "mnli", "train"): ["A b.", "C."],
              ("glue", "stsb", "train"): ["A plane takes off.", "A jet departs."]}
    for (suite, name, split), texts in fields.items():
        example = read(glue_root, suite, name, split)[0]
        assert bool(example.segments) != bool(example.candidates)
        assert all(1 <= len(texts) <= 2 for texts in (example.segments, *example.candidates) if texts)
        for text in texts:
            assert text in model_text(example), (name, text)


@pytest.mark.parametrize(("name", "text", "line"), [
    ("RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n\n1\ta b\tentailment\n", 4),
    ("RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailed\n", 2),
    ("CoLA/train.tsv", "gj04\t1\t\tFine.\ngj04\t1\tToo\tmany\tcolumns\n", 2),
    ("STS-B/train.tsv", GLUE_FIXTURES["STS-B/train.tsv"].replace("4.250", "high"), 2),
])
def test_glue_malformed_row_names_file_and_line(tmp_path, name, text, line):
    spec = get_task("glue", {"RTE": "rte", "CoLA": "cola", "STS-B": "stsb"}[name.split("/")[0]])
    path = write(tmp_path / name, text)
    with pytest.raises(ConfigurationError, match=rf"train\.tsv, line {line}:"):
        spec.reader(path.parent, "train")


@pytest.mark.parametrize(("text", "line", "message"), [
    ('{"premise": "a", "hypothesis": "b", "label": "entailment", "idx": 0}\n{"premise": oops}\n', 2, "invalid JSON"),
    ('\n{"premise": "a", "label": "entailment", "idx": 0}\n', 2, "missing field 'hypothesis'"),
    ('{"premise": "a", "hypothesis": "b", "label": "maybe", "idx": 0}\n', 1, "label 'maybe'"),
    ('[1, 2]\n', 1, "expected a JSON object"),
])
def test_superglue_malformed_line_names_file_and_line(tmp_path, text, line, message):
    write(tmp_path / "RTE" / "val.jsonl", text)
    with pytest.raises(ConfigurationError, match=rf"val\.jsonl, line {line}: .*{message}"):
        get_task("superglue", "rte").reader(tmp_path / "RTE", "dev")


def test_missing_split_and_unknown_names(tmp_path):
    with pytest.raises(MissingTaskData, match="dev_matched.tsv"):
        get_task("glue", "mnli").reader(tmp_path / "MNLI", "dev_matched")
    with pytest.raises(MissingTaskData, match="val.jsonl"):
        get_task("superglue", "boolq").reader(tmp_path / "BoolQ", "dev")
    with pytest.raises(ConfigurationError, match=r"known tasks: cola, sst2, .*\bax\b"):
        get_task("glue", "mnli-mm")
    with pytest.raises(ConfigurationError, match="known tasks: boolq, cb, copa, .*axg"):
        get_task("superglue", "wnli")
    with pytest.raises(ConfigurationError, match="no split 'train'"):
        get_task("glue", "ax").reader(tmp_path / "diagnostic", "train")
    with pytest.raises(ConfigurationError, match="no split 'validation'"):
        get_task("superglue", "cb").reader(tmp_path / "CB", "validation")


# Record counts of the staged files (shared/data/README.md); MultiRC counts answer options.
STAGED_COUNTS = {
    ("glue", "cola", "train"): 8551, ("glue", "cola", "dev"): 1043, ("glue", "cola", "test"): 1063,
    ("glue", "sst2", "train"): 67349, ("glue", "sst2", "dev"): 872, ("glue", "sst2", "test"): 1821,
    ("glue", "mrpc", "train"): 3667, ("glue", "mrpc", "dev"): 408, ("glue", "mrpc", "test"): 1725,
    ("glue", "stsb", "train"): 5749, ("glue", "stsb", "dev"): 1500, ("glue", "stsb", "test"): 1379,
    ("glue", "qnli", "dev"): 5463, ("glue", "qnli", "test"): 5463,
    ("glue", "rte", "train"): 2490, ("glue", "rte", "dev"): 277, ("glue", "rte", "test"): 3000,
    ("glue", "wnli", "train"): 635, ("glue", "wnli", "dev"): 71, ("glue", "wnli", "test"): 146,
    ("glue", "ax", "diagnostic-full"): 1104, ("glue", "ax", "diagnostic"): 1104,
    ("superglue", "boolq", "dev"): 3270,
    ("superglue", "cb", "train"): 250, ("superglue", "cb", "dev"): 56, ("superglue", "cb", "test"): 250,
    ("superglue", "copa", "train"): 400, ("superglue", "copa", "dev"): 100, ("superglue", "copa", "test"): 500,
    ("superglue", "multirc", "dev"): 4848,
    ("superglue", "rte", "train"): 2490, ("superglue", "rte", "dev"): 277, ("superglue", "rte", "test"): 3000,
    ("superglue", "wic", "train"): 5428, ("superglue", "wic", "dev"): 638, ("superglue", "wic", "test"): 1400,
    ("superglue", "wsc", "train"): 554, ("superglue", "wsc", "dev"): 104, ("superglue", "wsc", "test"): 146,
    ("superglue", "axb", "dev"): 1104, ("superglue", "axb", "test"): 1104,  # from glue/diagnostic-full.tsv
    ("superglue", "axg", "dev"): 356, ("superglue", "axg", "test"): 356,
}


def test_staged_real_data_reads_with_official_counts():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no staged data at {SHARED_DATA}")
    read_counts, examples = {}, {}
    for suite in ("glue", "superglue"):
        for spec in suite_tasks(suite):
            for split in (*(() if spec.parent else ("train",)), *spec.dev_splits, *spec.test_splits):
                try:
                    examples[suite, spec.name, split] = read(SHARED_DATA, suite, spec.name, split)
                except MissingTaskData:
                    continue
                read_counts[suite, spec.name, split] = len(examples[suite, spec.name, split])
    assert read_counts == STAGED_COUNTS
    for (suite, name, split), items in examples.items():
        spec = get_task(suite, name)
        test = split in spec.test_splits
        assert all((e.label is None) == test for e in items), (name, split)
        assert all(e.segments or e.candidates for e in items)
    multirc = examples["superglue", "multirc", "dev"]
    assert len({e.group for e in multirc}) == 953 and len({e.idx["paragraph"] for e in multirc}) == 83
    wsc_texts = [e.segments[0] for e in examples["superglue", "wsc", "dev"]]
    assert all(text.count("*") >= 2 and text.count("#") >= 2 for text in wsc_texts)
    full, plain = examples["glue", "ax", "diagnostic-full"], examples["glue", "ax", "diagnostic"]
    assert [(e.idx, tuple(s.strip() for s in e.segments)) for e in full] == [
        (e.idx, tuple(s.strip() for s in e.segments)) for e in plain]
