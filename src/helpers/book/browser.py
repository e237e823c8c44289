"""The neuron browser: one page of the book, searchable in the browser without a server.

A row per analysed neuron of the embedded reference model, of the preset's real model
(`single_model`, Gemma 3 270M on the default preset: its per-layer sample, its vocabulary classes
and the neurons of its strongest attention pairs) and of the second real model (`second_model`,
SmolLM2-135M: the neurons of its strongest attention pairs, chapter 06), with the numbers the chapters published (`report.publish_neurons`: universality, family and
best feature, vocabulary-effect class, entropy and attention scores), and a card per neuron: its top
activating contexts (circuitsvis, from one shared copy of the circuitsvis bundle), the tokens its
output promotes and suppresses most (its direct logit effect: W_U w_out, through the
norms where the model has them), and its activation split by its best feature.

Everything the page needs is written under the site's `_static/`: `circuitsvis.js` (the bundle,
once) and `neurons/data.js` (the table and the cards as one JavaScript object; a `<script>` file,
not JSON fetched at run time, so the page also works from `file://`). `python -m helpers.book`
builds it; `page_html` is the page's markup.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from helpers.streaming.activations import hook_activations
from helpers.core.cache import Result, cached_result, read_json, write_json
from helpers.core.presets import Preset
from helpers.core.report import model_label, results_folder
from helpers.models import effective

CARD_CONTEXTS = 3      # top activating contexts per neuron
CARD_WINDOW = 10       # tokens before the top token shown in a context
CARD_VOCAB = 8         # promoted and suppressed tokens per neuron
TABLE_ROWS_SHOWN = 400  # the page shows this many matching rows at a time (the search covers all)


def published_neurons(results_dir: Path) -> pd.DataFrame:
    """Every chapter's per-neuron table for one preset (`results/<preset>/neurons/*.csv`), joined
    per model on (layer, neuron): one row per (model, layer, neuron)."""
    files = sorted(Path(results_dir).glob("*.csv"))
    if not files:
        return pd.DataFrame(columns=["model", "layer", "neuron"])
    per_model: dict[str, pd.DataFrame] = {}
    for f in files:
        df = pd.read_csv(f)
        for model, part in df.groupby("model"):
            part = part.drop(columns="model")
            old = per_model.get(model)
            per_model[model] = part if old is None else old.merge(part, on=["layer", "neuron"], how="outer",
                                                                  suffixes=("", f" ({f.stem.split('--')[0]})"))
    out = pd.concat([d.assign(model=m) for m, d in per_model.items()], ignore_index=True)
    cols = ["model", "layer", "neuron"] + [c for c in out.columns if c not in ("model", "layer", "neuron")]
    return out[cols].sort_values(["model", "layer", "neuron"]).reset_index(drop=True)


def circuitsvis_bundle() -> str:
    """The circuitsvis JavaScript bundle (defines the global `CircuitsVis`), cut from the inlined
    build that `local_src` embeds in every view."""
    import circuitsvis

    src = circuitsvis.tokens.colored_tokens(["a"], [0.0]).local_src
    start = src.index('<script crossorigin type="module">') + len('<script crossorigin type="module">')
    body = src[start:src.index("CircuitsVis.render(", start)]
    return re.sub(r"//# sourceMappingURL=\S+", "", body).strip() + "\n"


@torch.no_grad()
def neuron_cards(model, rows: torch.Tensor, neurons: pd.DataFrame, strings: Sequence[str], vocab_strings: Sequence[str],
                 drop_ids: Sequence[int], display_ids: torch.Tensor | None = None, batch_size: int = 8,
                 k: int = CARD_CONTEXTS, window: int = CARD_WINDOW, n_vocab: int = CARD_VOCAB) -> dict[str, dict]:
    """Card data of `neurons` (columns `layer`, `neuron`): {"L{layer}.{neuron}": {"contexts": [{"tokens",
    "values"}] (the `k` most active tokens of `rows` [rows, pos], each with the `window` tokens
    before it), "promoted"/"suppressed": [[token, direct logit effect]]}. The direct effect of a
    unit of activation is W_U w_out, read through the norms around it where the model has them
    (`effective.output_directions` @ `effective.effective_unembed`: Gemma's norm after the MLP and
    its final norm's weights, with their scales held fixed); for GPT-2-style models it is W_U w_out.

    `strings` maps the ids of `display_ids` (the same shape as `rows`; default `rows`) to text;
    `vocab_strings` maps the model's output ids; `drop_ids` are never a top token (BOS, padding).
    Activations are kept for all of `rows` at once (`[rows, pos, neurons]` fp16), so `rows` should be
    a few thousand tokens."""
    display_ids = rows if display_ids is None else display_ids
    layers = sorted(int(l) for l in neurons.layer.unique())
    names = [f"blocks.{l}.mlp.hook_post" for l in layers]
    cols = {l: torch.tensor(neurons[neurons.layer == l].neuron.to_numpy(), dtype=torch.long) for l in layers}
    chunks = []
    for i in range(0, len(rows), batch_size):
        ids = rows[i:i + batch_size]
        acts = hook_activations(model, ids, names)  # [batch * pos, d_mlp] per layer
        per = [acts[n][:, cols[l].to(acts[n].device)] for n, l in zip(names, layers)]
        chunks.append(torch.cat(per, dim=1).float().cpu().half().reshape(len(ids), ids.shape[1], -1))
    acts = torch.cat(chunks).float()  # [rows, pos, neurons]
    banned = torch.isin(rows, torch.tensor(list(drop_ids), dtype=rows.dtype))
    acts[banned] = float("-inf")
    order = [(l, int(n)) for l in layers for n in cols[l].tolist()]
    flat = acts.reshape(-1, acts.shape[-1])
    top = flat.topk(min(k, flat.shape[0]), dim=0).indices  # [k, neurons]
    w_u = effective.effective_unembed(model)
    promoted, suppressed = [], []  # per neuron, in `order`: (values, ids) of the direct effect's extremes
    for l in layers:
        w_out = effective.output_directions(model, l)[cols[l].to(w_u.device)]  # [neurons of l, d_model]
        for i in range(0, len(w_out), 256):  # [256, d_vocab] at a time: Gemma's vocabulary is 262k
            effect = w_out[i:i + 256] @ w_u
            up, down = effect.topk(n_vocab, dim=1), (-effect).topk(n_vocab, dim=1)
            promoted += list(zip(up.values.cpu(), up.indices.cpu()))
            suppressed += list(zip(-down.values.cpu(), down.indices.cpu()))
    cards = {}
    a_np, ids_np, top_np = acts.numpy(), display_ids.numpy(), top.numpy()  # plain arrays: no per-value tensor ops
    for j, (l, n) in enumerate(order):
        contexts = []
        for idx in top_np[:, j].tolist():
            r, p = divmod(idx, a_np.shape[1])
            if not np.isfinite(a_np[r, p, j]):
                continue
            lo = max(1, p - window)
            vals = a_np[r, lo:p + 1, j].astype(np.float64)
            contexts.append({"tokens": [strings[t] for t in ids_np[r, lo:p + 1].tolist()],
                             "values": [round(v, 3) if math.isfinite(v) else 0.0 for v in vals.tolist()]})
        cards[f"L{l}.{n}"] = {"contexts": contexts,
                              "promoted": [[vocab_strings[t], round(float(v), 3)] for v, t in zip(promoted[j][0].tolist(), promoted[j][1].tolist())],
                              "suppressed": [[vocab_strings[t], round(float(v), 3)] for v, t in zip(suppressed[j][0].tolist(), suppressed[j][1].tolist())]}
    return cards


def cached_cards(family, member: str, neurons: pd.DataFrame, n_tokens: int, artifacts_dir: Path, batch_size: int = 8) -> Result:
    """`neuron_cards` of one member over about `n_tokens` held-out tokens, cached by what made them:
    the Result, whose file `cards.json` holds the cards."""
    from helpers.taxonomy.features import vocab_strings_gpt2

    rows = family.token_table(n_tokens)
    ident = {"member": family.identity[family.member(member)], "rows": rows.sha256, "n_rows": len(rows.ids),
             "neurons": int(pd.util.hash_pandas_object(neurons[["layer", "neuron"]], index=False).sum()),
             "k": CARD_CONTEXTS, "window": CARD_WINDOW, "n_vocab": CARD_VOCAB, "version": 2}

    def compute(folder: Path) -> dict:
        model = family.load(family.member(member))
        codec = family.codec
        if rows.gpt2_ids is not None:
            strings, display = vocab_strings_gpt2(), rows.gpt2_ids
        else:
            strings, display = codec.token_strings(), rows.ids
        cards = neuron_cards(model, rows.ids, neurons, strings, codec.token_strings(), codec.drop_ids, display, batch_size)
        write_json(folder / "cards.json", cards)
        return {"n_neurons": len(cards)}

    return cached_result("neuron_cards", ident, compute, root=artifacts_dir, prefix=f"{family.name}-{member}")


def write_assets(static_dir: Path, table: pd.DataFrame, cards: dict[str, dict]) -> dict[str, int]:
    """Write `circuitsvis.js` and `neurons/data.js` under `static_dir`; returns their sizes in bytes.
    `cards` is {model: {"L1.2": card}}."""
    static_dir.mkdir(parents=True, exist_ok=True)
    (static_dir / "neurons").mkdir(exist_ok=True)
    bundle = static_dir / "circuitsvis.js"
    bundle.write_text(circuitsvis_bundle())
    cols = [c for c in table.columns]
    rows = [[None if (isinstance(v, float) and np.isnan(v)) else (round(v, 4) if isinstance(v, float) else v)
             for v in r] for r in table.astype(object).itertuples(index=False)]
    data = {"columns": cols, "rows": rows, "cards": cards}
    path = static_dir / "neurons" / "data.js"
    path.write_text("window.NEURON_BROWSER = " + json.dumps(data, separators=(",", ":"), default=str) + ";\n")
    return {"circuitsvis.js": bundle.stat().st_size, "neurons/data.js": path.stat().st_size}


def page_html(static_prefix: str = "../_static") -> str:
    """The page's markup and script: a search box over every column, the first matching rows, and
    the card of the neuron named in the URL's #fragment (else of the first row), drawn with
    circuitsvis into a `circuits-vis-*` container (which the browser test checks)."""
    return f"""<div id="nb-app">
<p><input id="nb-q" type="search" size="60" placeholder="search every column: L1.23, unigram, prediction, smollm2 ...">
<span id="nb-count"></span></p>
<div id="nb-card" style="border:1px solid #ddd;padding:0.5em 1em;margin:1em 0"><h3 id="nb-card-title"></h3>
<div id="nb-card-numbers"></div><div id="nb-card-vocab"></div>
<div id="circuits-vis-nb-card" style="min-height:2em"></div></div>
<div style="overflow-x:auto"><table id="nb-table" class="table"><thead></thead><tbody></tbody></table></div>
</div>
<script src="{static_prefix}/circuitsvis.js"></script>
<script src="{static_prefix}/neurons/data.js"></script>
<script>
(function () {{
  const D = window.NEURON_BROWSER, cols = D.columns, iModel = cols.indexOf("model"), iL = cols.indexOf("layer"), iN = cols.indexOf("neuron");
  const id = r => r[iModel] + "|L" + r[iL] + "." + r[iN];
  const esc = s => String(s).replace(/[&<>"]/g, c => ({{"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}}[c]));
  const fmt = v => v === null ? "" : (typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(3) : v);
  const text = D.rows.map(r => r.map(fmt).join(" ").toLowerCase() + " l" + r[iL] + "." + r[iN]);
  document.querySelector("#nb-table thead").innerHTML = "<tr>" + cols.map(c => "<th>" + esc(c) + "</th>").join("") + "</tr>";
  function card(key) {{
    const r = D.rows.find(x => id(x) === key) || D.rows[0];
    if (!r) return;
    const c = (D.cards[r[iModel]] || {{}})["L" + r[iL] + "." + r[iN]];
    document.getElementById("nb-card-title").textContent = r[iModel] + " · L" + r[iL] + "." + r[iN];
    document.getElementById("nb-card-numbers").innerHTML = "<p>" + cols.map((k, j) => r[j] === null ? "" : "<b>" + esc(k) + "</b>: " + esc(fmt(r[j]))).filter(Boolean).join(" · ") + "</p>";
    const target = document.getElementById("circuits-vis-nb-card");
    if (!c) {{ document.getElementById("nb-card-vocab").innerHTML = "<p>(no card for this neuron)</p>"; target.innerHTML = "<p>no contexts</p>"; return; }}
    const toks = l => l.map(t => "<code>" + esc(t[0]) + "</code> " + t[1]).join(", ");
    document.getElementById("nb-card-vocab").innerHTML = "<p><b>promotes</b> (direct effect, W_U w_out through the norms): " + toks(c.promoted) + "</p><p><b>suppresses</b>: " + toks(c.suppressed) + "</p><p><b>top activating contexts</b> (last token most active):</p>";
    const tokens = [], values = [];
    c.contexts.forEach((x, i) => {{ if (i) {{ tokens.push(" ⏎ "); values.push(0); }} tokens.push(...x.tokens); values.push(...x.values); }});
    target.innerHTML = "";
    CircuitsVis.render("circuits-vis-nb-card", CircuitsVis.ColoredTokens, {{tokens: tokens, values: values}});
  }}
  function show() {{
    const q = document.getElementById("nb-q").value.trim().toLowerCase().split(/\\s+/).filter(Boolean);
    const hits = [];
    for (let j = 0; j < D.rows.length; j++) if (q.every(w => text[j].includes(w))) hits.push(j);
    document.getElementById("nb-count").textContent = hits.length + " of " + D.rows.length + " neurons" + (hits.length > {TABLE_ROWS_SHOWN} ? " (first {TABLE_ROWS_SHOWN} shown)" : "");
    document.querySelector("#nb-table tbody").innerHTML = hits.slice(0, {TABLE_ROWS_SHOWN}).map(j => {{
      const r = D.rows[j];
      return "<tr>" + r.map((v, k) => "<td>" + (k === iN ? '<a href="#' + esc(id(r)) + '">' + esc(v) + "</a>" : esc(fmt(v))) + "</td>").join("") + "</tr>";
    }}).join("");
  }}
  document.getElementById("nb-q").addEventListener("input", show);
  window.addEventListener("hashchange", () => card(decodeURIComponent(location.hash.slice(1))));
  show();
  card(decodeURIComponent(location.hash.slice(1)));
}})();
</script>
"""


ATTENTION_COLUMN = "attention score h_n (strongest later head)"  # chapter 06's published column


def _browsable(table: pd.DataFrame, reference: str, attention_models: tuple[str, ...] = ()) -> pd.DataFrame:
    """The rows the page lists: every neuron of the reference model; of any other model, the neurons
    chapter 03 analysed (a `family`) and those with a vocabulary class, not every neuron a
    weight-only pass scored (Gemma has 37k); of the `attention_models` (the real models of chapter
    06), also the neurons chapter 06 published (those of their strongest pairs)."""
    keep = table.model == reference
    if "family" in table:
        keep |= table["family"].notna()
    if "vocabulary class" in table:
        keep |= table["vocabulary class"].notna() & (table["vocabulary class"] != "none")
    if attention_models and ATTENTION_COLUMN in table:
        keep |= table.model.isin(list(attention_models)) & table[ATTENTION_COLUMN].notna()
    return table[keep].reset_index(drop=True)


def _carded(rows: pd.DataFrame) -> pd.Series:
    """Which of a real model's listed neurons get a card: those chapter 03 analysed (a `family`) or
    chapter 06 published (an attention score)."""
    keep = pd.Series(False, index=rows.index)
    for col in ("family", ATTENTION_COLUMN):
        if col in rows:
            keep |= rows[col].notna()
    return keep


def build_browser(site: Path, params: Preset, n_tokens: int = 8192, device: str = "cpu") -> dict:
    """Write the neuron browser of a built preset into `site`: the page's markup
    (`book/_generated/neurons.html`) and its data under `book/_static/`. Every published neuron gets
    a row; cards (cached) are computed for every neuron of the reference model and for the real
    models' neurons that chapter 03 analysed or chapter 06 published (not every neuron chapter 04
    classified: that would put megabytes of cards into the book)."""
    from helpers.models.families import load_family

    artifacts_dir = params.artifacts_path
    table = published_neurons(results_folder(params) / "neurons")
    fam = load_family(params["family"], params, device=device)
    real = [load_family(params[k], params, device=device) for k in ("single_model", "second_model") if params.get(k)]
    table = _browsable(table, model_label(fam), tuple(model_label(r) for r in real))
    cards: dict[str, dict] = {}
    ref = fam.reference
    sources = {model_label(fam, ref): (fam, fam.member(ref))}
    for r in real:
        sources[model_label(r)] = (r, r.reference)
    for model_name, (family, member) in sources.items():
        rows = table[table.model == model_name]
        if family is not fam:
            rows = rows[_carded(rows)]
        neurons = rows[["layer", "neuron"]].drop_duplicates()
        if neurons.empty:
            continue
        n = n_tokens if family is fam else min(n_tokens, 4096)
        res = cached_cards(family, member, neurons, n, artifacts_dir, batch_size=int(params.get("batch_size", 8)))
        cards[model_name] = read_json(res.file("cards.json"))
    sizes = write_assets(site / "book" / "_static", table, cards)
    page = site / "book" / "_generated" / "neurons.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(page_html())
    return {"neurons": len(table), "models": sorted(table.model.unique()) if len(table) else [], "bytes": sizes}
