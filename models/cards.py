"""Model cards for the bundled checkpoints, written from measured figures (``swapmoe.models.evaluate``)."""

from __future__ import annotations

import json
from pathlib import Path

from swapmoe.models.bundled import LM_DIR, SWITCH_DIR

DATA = """\
## Data

Real text nobody in this project wrote, read offline from the machine (`models/corpus.py`):

| domain | source | license |
|---|---|---|
| code | CPython 3.11 standard library sources | PSF License 2.0 |
| prose | Perl core module documentation, rendered from POD by `pod2text` | Artistic License or GPL (Perl's terms) |
| manual | Debian manual pages, sections 1 and 8, rendered by `man` | each package's free license (`/usr/share/doc/<package>/copyright`) |

Documents (one source file each) are split into training and held-out sets by a hash of their
name, so no held-out document was trained on. Held-out excerpts ship in `models/data/eval/`
(see `models/data/SOURCES.md`).
"""


_STATISTICS = (
    ("repeat-activation rate, consecutive tokens", "repeat_rate", "repeat_chance", "chance"),
    ("usage similarity, consecutive inputs (histogram intersection)", "next_input_similarity",
     "random_input_similarity", "random pairs of inputs"),
    ("share of a document's routing on its top 25% experts", "doc_top25_share", "corpus_top25_share",
     "whole corpus"),
    ("effective experts used by a document (exp entropy)", "doc_effective_experts", "corpus_effective_experts",
     "whole corpus"),
)


def _routing_table(r: dict, control: dict | None = None) -> str:
    head = "| statistic (mean over MoE layers) | measured | reference | reference is |"
    rule = "|---|---|---|---|"
    if control:
        head, rule = head + " untrained model: measured / reference |", rule + "---|"
    lines = [head, rule]
    for title, measured, reference, meaning in _STATISTICS:
        row = f"| {title} | {r[measured]:.3f} | {r[reference]:.3f} | {meaning} |"
        if control:
            row += f" {control[measured]:.3f} / {control[reference]:.3f} |"
        lines.append(row)
    return "\n".join(lines)


def lm_card(results: dict) -> str:
    ppl = results["perplexity"]
    r = results["routing"]
    table = "\n".join(f"| {d} | {ppl[d]:.2f} | {results['eval_texts'][d]} |" for d in ppl)
    usage = r["middle_layer_usage"]
    experts = len(next(iter(usage.values())))
    top = "\n".join(f"| {d} | " + " | ".join(f"{100 * u:.0f}" for u in usage[d]) + " |" for d in usage)
    top = ("| domain | " + " | ".join(f"E{e}" for e in range(experts)) + " |\n|---|" + "---|" * experts + "\n" + top)
    return f"""# swapmoe-lm

A small decoder-only Mixture-of-Experts language model in the standard transformers
`MixtralForCausalLM` class: 6 layers, 16 experts per layer, top-2 routing, hidden size 128,
{results['parameters'] / 1e6:.2f} M parameters (float32), a byte-level BPE tokenizer of
{results['uniform_perplexity']} tokens trained with `tokenizers`. It is the embedded default model
of `swapmoe demo` and the model behind SwapMoE's quality measurements.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("models/swapmoe-lm")
tokenizer = AutoTokenizer.from_pretrained("models/swapmoe-lm")
```

{DATA}
## Training

`python -m swapmoe.models.training.train_lm` (seeded, CPU only, resumable, a progress bar): 2400 steps
of 16 windows of 256 tokens, each window's domain drawn uniformly; AdamW, peak learning rate
2e-3, cosine decay, load-balancing loss 0.01.

## Held-out perplexity

Reproduce: `python -m swapmoe.models.evaluate lm` (rewrites this card and `eval_results.json`).

| domain | perplexity | held-out texts |
|---|---|---|
{table}

A uniform distribution over the vocabulary has perplexity {results['uniform_perplexity']}.

## Routing: does the paper's premise hold?

Measured on the held-out texts; the last column is the same configuration with random weights,
the control for what token statistics alone produce.

{_routing_table(r, results['untrained_routing'])}

Reading the table: consecutive held-out inputs of one domain share {r['next_input_similarity']:.0%} of
their expert usage, against {r['random_input_similarity']:.0%} for two inputs drawn at random, so the
resident set that served one input mostly suits the next: the locality SwapMoE's periodic updates
rely on. A token keeps {r['repeat_rate']:.0%} of the previous token's experts against
{r['repeat_chance']:.0%} by chance; the untrained control repeats
{results['untrained_routing']['repeat_rate']:.0%}, so token-to-token repetition comes largely from
token statistics, not from learned specialization. A document puts {r['doc_top25_share']:.0%} of its
routing on a quarter of the experts.

Per-domain expert usage: the mean Jensen-Shannon divergence between two domains' usage is
{r['domain_js_divergence']:.3f} bits (0 = identical usage, 1 = disjoint). Share of routed
assignments (%) per expert in the middle MoE layer:

{top}
"""


def switch_card(results: dict) -> str:
    examples = "\n".join(f"| `{e['name']}` | {e['reference']} | {e['prediction']} |" for e in results["examples"])
    return f"""# swapmoe-switch

A small Switch Transformers encoder-decoder (`SwitchTransformersForConditionalGeneration`, the
paper's model family): 4 encoder and 4 decoder layers, every other one a sparse layer of 16
top-1 experts, d_model 128, {results['parameters'] / 1e6:.2f} M parameters (float32). It
summarizes a Python function's code into the first line of its docstring. It shares the
tokenizer of `swapmoe-lm`, with one addition: its normalizer rewrites code as lower-case words
(`swapmoe.models.corpus.code_as_words`: `getFileName`, `get_file_name` -> `get file name`,
punctuation set apart), as the model was trained, so raw source works through any loader:

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
model = AutoModelForSeq2SeqLM.from_pretrained("models/swapmoe-switch")
tokenizer = AutoTokenizer.from_pretrained("models/swapmoe-switch")
ids = tokenizer("def read_file(path):\\n    return open(path).read()", return_tensors="pt")
print(tokenizer.decode(model.generate(**ids, max_new_tokens=24)[0], skip_special_tokens=True))
```

{DATA}
Summarization pairs come from functions that have a docstring whose first line has 3 to 20
words; the docstring is removed from the body. Training pairs come from the training modules of
the code domain and, for more data, from the Python packages installed beside the project (its
environment: torch, transformers, ray, ...), Debian's `/usr/lib/python3/dist-packages`, and the
pip and setuptools that ship with CPython, each under its own free license. Pairs identical to a
held-out pair and repeated bodies are dropped. Held-out pairs come only from held-out CPython
modules; a hashed 5% of the CPython training modules is kept out for validation.

## Training

`python -m swapmoe.models.training.train_switch` (seeded, CPU only, resumable, a progress bar; about 45
minutes on 2 cores, logging validation figures every 500 steps): 4000 steps of 24 examples.
Sources are the function's code read as words (identifiers split, lower case), cut to 96
tokens; AdamW, peak learning rate 1e-3, warm-up then cosine decay; router load-balancing loss
0.01 and z-loss 0.001. Two parts of the recipe make the model read its input:

- **The relative position biases learn 100 times faster** (and without weight decay). A T5-family
  model knows where a token is only through these biases, scalars added to the attention
  logits. AdamW moves a parameter about one learning rate per step, so at 1e-3 the few logit
  units that a positional pattern needs ("the words after `def`") take thousands of steps, and
  until then the decoder cannot find anything in its source. A synthetic probe measures this:
  copying the 3 tokens after a marker, this configuration stays at the floor of a model that
  ignores its source for 1000 steps, and learns it with the multiplier
  (`python -m benchmarks.source_probe`, `benchmarks/results/RESULTS-source-probe.md`).
- **The first 600 steps ask only for the function's name** (as words), and a fifth of the
  examples after them. Only a decoder that finds the name in its source can do that, and a
  summary mostly reuses the function's words. Measured side by side (same seed, 4000 steps):
  without the 600 name-only steps the model reached held-out Rouge-2 0.049 (its validation loss
  was 0.16 nats lower with each function's own code than with another's), with them 0.056
  (0.24 nats).

Without them (the previous checkpoint: peak learning rate 3e-3, raw code, 12 k pairs) the
decoder learned the style of docstrings and ignored the code: held-out Rouge-2 0.022, with a
held-out loss of 4.51 given each function's own code and 4.54 given another's. Recipes kept in
`docs/experiments/` (a masked-token loss on the encoder, a task copying the code's words, a
lower learning rate) did not fix that; they fought the symptom, an encoder whose positions
collapse to one vector because its output is not being read.

This checkpoint's held-out loss is {results['loss_own_source']:.2f} given each function's own code and
{results['loss_other_source']:.2f} given another function's code. It picks words from the code (see the
examples: registry, cached, instance) but often wraps them in a generic sentence, and it stays
below the retrieval reference: more steps would help (validation Rouge-2 still rose over the
last 1000 steps), within the hour that the training budget allows.

## Rouge-2 on held-out functions

Reproduce: `python -m swapmoe.models.evaluate switch` (rewrites this card and `eval_results.json`).
Rouge-2 F1 from the `rouge-score` package, stemmed, greedy decoding, {results['pairs']} pairs.

| summarizer | Rouge-2 |
|---|---|
| swapmoe-switch | {results['rouge2']:.4f} |
| trivial baseline: the function's name as words | {results['baseline_rouge2']:.4f} |
| non-neural reference: summary of the most similar training function (TF-IDF) | {results['retrieval_rouge2']:.4f} |

This model's gain over the name baseline, paired bootstrap over the held-out functions (95%):
{results['gap_95ci'][0]:+.4f} to {results['gap_95ci'][1]:+.4f}.

| function | reference | prediction |
|---|---|---|
{examples}

## Routing of the encoder's sparse layers

{_routing_table(results['routing'])}
"""


def write(model: str, results: dict) -> Path:
    directory = LM_DIR if model == "lm" else SWITCH_DIR
    (directory / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    card = directory / "README.md"
    card.write_text(lm_card(results) if model == "lm" else switch_card(results))
    return card
