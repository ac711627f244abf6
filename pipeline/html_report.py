"""The run's offline HTML page: metrics with intervals and tests, plots, and a browser of the
preference data, in one self-contained file (`html_report` stage, docs/report.md).

Why a static page: people look at a page rather than read `reports/metrics.json`, and hospital
machines have no network, so `dvc plots show` (which loads Vega from a CDN) gives a blank page
there. Everything is inline: images are base64 data URIs, charts are Vega-Lite specs rendered to
SVG at build time by `vl-convert` (a Vega engine compiled into the wheel, no browser and no
network), the style is one small `<style>` block, and there is no JavaScript. `build_page` checks
the finished page for anything a browser could fetch (`external_references`) and fails, as a bug,
if it finds one; text that merely mentions a URL is escaped so that it cannot read as one.

What the page shows:

1. Metric tables: per model key of the metrics report with a prediction table (`sft`,
   `sft_blind`, `aligned`, `aligned_blind`), strict closed accuracy and open recall with 95% BCa
   bootstrap intervals and the paired test against `sft` (a blind control against `sft_blind`),
   computed by `pipeline.compare.compare_runs` on the one run; the image reliance likewise; the
   report's own `aligned_minus_sft` deltas, its LLaVA-Med `legacy` numbers and log-prob gaps.
2. Plots: the dvclive training curves of `sft` and `train` and the HSCR Fig. 4 log-prob gap
   histograms; a missing or empty folder gives a note on the page, not a failure.
3. A browser of a seeded sample of the preference entries: the image, the question, the chosen
   answer, every dispreferred answer with its replaced tokens marked (joined with the candidates
   `sample` wrote), its rank similarity, level, judge score, weight and consensus transcript, the
   rationales and the visual dispreferred x* where present, and what each model answers with and
   without the image.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from pipeline.errors import DataError
from pipeline.params import Config
from pipeline.statistics import MCNEMAR

if TYPE_CHECKING:
    from pipeline.evaluation import MaxNewTokens

# What defines a run, shown in the page's header: the source of the data, the SFT model, how
# preferences were made and how the aligned model was trained (the keys the sweeps vary).
RUN_KEYS = (
    "prepare.source",
    "sft.model",
    "sft.seed",
    "mine.strategy",
    "mask_ratio",
    "sample.source",
    "sample.mask_strategy",
    "sample.visual_dispreference.mode",
    "sample.seed",
    "train.loss",
    "train.weighted",
    "train.dispreferred",
    "train.seed",
)
# The sampled entries are answered as `evaluate` answers the test split.
ANSWER_KEYS = {"batch_size": "evaluate.batch_size", "max_new_tokens": "evaluate.max_new_tokens"}

# The dvclive folders of the training stages (under --live), in page order.
TRAINING_RUNS = {"sft": "SFT (sft stage)", "train": "preference training (train stage)"}
BASELINE = "run/sft"  # `compare_runs` baseline: the one run's SFT model (blind controls: sft_blind)
ALPHA = 0.05
# Images wider or taller than this are shrunk for the page (a 2k-pixel X-ray would make it tens of MB).
MAX_IMAGE_SIDE = 384


class HtmlReportConfig(Config):
    """The `html_report:` section: the offline HTML page of a run (docs/report.md)."""

    # The header shows the keys that define the run (RUN_KEYS) and the models answer the sampled
    # entries with `evaluate`'s settings: the stage reads both, so dvc.yaml declares them too.
    reads: ClassVar[dict[str, str]] = {**ANSWER_KEYS, **{key: key for key in RUN_KEYS}}

    entries: int = Field(ge=1, description="preference entries shown in the page's browser: a seeded sample of "
                         "data/scored.parquet, each answered by every model with and without the image")
    seed: int = Field(ge=0, description="seeds the sample of entries and every bootstrap and permutation of the "
                      "metric tables")
    bootstrap_resamples: int = Field(ge=1, description="bootstrap resamples of the 95% intervals and random "
                                     "permutations of the paired tests")

    _context: dict[str, Any] = PrivateAttr()

    @model_validator(mode="after")
    def _other_sections(self, info: ValidationInfo) -> HtmlReportConfig:
        context = info.context or {}
        missing = [dotted for label, dotted in self.reads.items() if label not in context]
        if missing:
            raise ValueError(f"needs {', '.join(missing)} of params.yaml (the page's header and the models' answers)")
        value = context["batch_size"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{ANSWER_KEYS['batch_size']}` must be an integer >= 1 (got {value!r})")
        _caps(context["max_new_tokens"])
        self._context = {label: context[label] for label in self.reads}
        return self

    def replace(self, **changes: Any) -> HtmlReportConfig:
        """A validated copy with `changes` applied, keeping the values read from other sections."""
        return type(self).model_validate({**self.model_dump(), **changes}, context=dict(self._context))

    @property
    def answer_batch_size(self) -> int:
        """`evaluate.batch_size`: entries per generation batch."""
        return self._context["batch_size"]

    @property
    def answer_max_new_tokens(self) -> MaxNewTokens:
        """`evaluate.max_new_tokens`: cap on an answer's length per answer type, in tokens."""
        return _caps(self._context["max_new_tokens"])

    @property
    def run_facts(self) -> dict[str, Any]:
        """The values of RUN_KEYS, for the header."""
        return {key: self._context[key] for key in RUN_KEYS}


def _caps(value: Any) -> MaxNewTokens:
    """`evaluate.max_new_tokens` as read from params.yaml, validated as `evaluate` validates it."""
    from pydantic import ValidationError

    from pipeline.evaluation import MaxNewTokens

    try:
        return MaxNewTokens.model_validate(value)
    except ValidationError:
        raise ValueError(f"`{ANSWER_KEYS['max_new_tokens']}` must map every answer type to an integer >= 1 "
                         f"(got {value!r})") from None


# ---------------------------------------------------------------------------------------------
# Escaping and the offline check


def text(value: Any) -> str:
    """`value` as HTML text: escaped, and with `://` written as a character reference, so that a URL
    in a question or a judge's reason is shown as written but the page never holds one."""
    return html.escape(str(value), quote=True).replace("://", ":&#47;&#47;")


_URL = re.compile(r"(?i)\b(?:https?|ftp|wss?|file)://")
_CSS_URL = re.compile(r"(?i)url\(\s*['\"]?([^'\")]*)")
# Attributes whose value a browser fetches (HTML and SVG).
_FETCHED = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background",
            "manifest", "ping", "codebase", "cite", "longdesc", "usemap", "icon"}
# Elements that load or run something by being there (a <meta http-equiv> refresh too).
_LOADING_TAGS = {"script", "iframe", "frame", "object", "embed", "applet", "link", "base", "audio", "video"}


class _References(HTMLParser):
    """Collects the attribute values and style text of a page that could load something."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_style = tag == "style"
        if tag in _LOADING_TAGS or (tag == "meta" and any(k == "http-equiv" for k, _ in attrs)):
            self.found.append(f"<{tag}>")
        for key, value in attrs:
            value = (value or "").strip()
            if key in _FETCHED and value and not value.startswith(("data:", "#")):
                self.found.append(f'{key}="{value[:80]}"')
            if key == "style":
                self._style(value)

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self._style(data)

    def _style(self, css: str) -> None:
        self.found += [f"url({m.group(1)})" for m in _CSS_URL.finditer(css) if not m.group(1).startswith(("data:", "#"))]
        if "@import" in css.lower():
            self.found.append("@import")


def external_references(page: str) -> list[str]:
    """Everything in `page` a browser could fetch from elsewhere: any URL at all, a script, frame,
    object, stylesheet link or <base>, an attribute that loads something (`src`, `href`, ...) and is
    not a `data:` URI or a `#fragment`, CSS `url(...)` and `@import`. Empty for an offline page."""
    parser = _References()
    parser.feed(page)
    parser.close()
    return [m.group(0) for m in _URL.finditer(page)] + parser.found


# ---------------------------------------------------------------------------------------------
# Charts: Vega-Lite rendered to inline SVG at build time


@dataclass(frozen=True)
class Plot:
    title: str
    svg: str


@dataclass(frozen=True)
class PlotGroup:
    """The charts of one source folder; `note` says why there are none."""

    title: str
    source: str
    plots: tuple[Plot, ...]
    note: str | None = None


def render_svg(spec: Mapping[str, Any], prefix: str) -> str:
    """A Vega-Lite spec with inline data as an inline SVG element.

    `vl-convert` renders it without a browser and with every data URL refused. The XML namespace
    declarations (URIs, not fetched, but the page must hold no URL) are dropped: the HTML parser
    puts an inline `<svg>` in the SVG namespace itself. Element ids, if any, get `prefix` so that
    several charts on one page cannot collide.
    """
    import vl_convert

    svg = vl_convert.vegalite_to_svg(dict(spec), allowed_base_urls=[])
    head_end = svg.index(">")
    head = re.sub(r'\s+xmlns(?::\w+)?="[^"]*"', "", svg[:head_end])
    svg = head + svg[head_end:]
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', svg)
    problems = external_references(svg)
    if problems:
        raise RuntimeError(f"vl-convert rendered external references into a chart: {problems[:5]}")
    return svg


def _number(value: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {value!r} is not a number") from None


def read_curves(folder: Path) -> dict[str, list[dict[str, float]]]:
    """The dvclive curves of one training run: metric name (its path under `plots/metrics`, e.g.
    `vision/loss`) → rows of `step` and `value`. A missing folder gives no curves."""
    root = folder / "plots" / "metrics"
    curves: dict[str, list[dict[str, float]]] = {}
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        name = path.relative_to(root).with_suffix("").as_posix()
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            columns = reader.fieldnames or []
            value_column = path.stem if path.stem in columns else next(
                (c for c in reversed(columns) if c not in ("step", "timestamp")), None)
            if "step" not in columns or value_column is None:
                raise DataError(f"{path}: expected dvclive's columns `step` and `{path.stem}`, got {columns}")
            curves[name] = [{"step": _number(r["step"], f"{path} step"),
                             "value": _number(r[value_column], f"{path} {value_column}")} for r in reader]
    return {name: rows for name, rows in curves.items() if rows}


def read_gap_histograms(folder: Path) -> dict[str, list[dict[str, float]]]:
    """The log-prob gap histograms of the `report` stage: modality → rows of `gap` (the bin centre)
    and one count per model. A missing folder gives none."""
    tables: dict[str, list[dict[str, float]]] = {}
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "gap" not in columns or len(columns) < 2:
                raise DataError(f"{path}: expected the columns `gap` and one count per model, got {columns}")
            tables[path.stem] = [{c: _number(r[c], f"{path} {c}") for c in columns} for r in reader]
    return {name: rows for name, rows in tables.items() if rows}


def curve_spec(name: str, rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    return {
        "width": 260, "height": 150,
        "data": {"values": list(rows)},
        "mark": {"type": "line", "point": len(rows) < 30},
        "encoding": {"x": {"field": "step", "type": "quantitative"},
                     "y": {"field": "value", "type": "quantitative", "title": name.rsplit("/", 1)[-1],
                           "scale": {"zero": False}}},
    }


def gap_spec(modality: str, rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Overlaid histograms, one colour per model, of the bins the `report` stage wrote (equal
    widths: each bar spans its centre ± half the distance between centres)."""
    models = [c for c in rows[0] if c != "gap"]
    centres = sorted(r["gap"] for r in rows)
    width = min((b - a for a, b in zip(centres, centres[1:], strict=False) if b > a), default=1.0)
    values = [{"start": r["gap"] - width / 2, "end": r["gap"] + width / 2, "model": m, "count": r[m]}
              for r in rows for m in models]
    return {
        "width": 300, "height": 150,
        "data": {"values": values},
        "mark": {"type": "bar", "opacity": 0.55},
        "encoding": {
            "x": {"field": "start", "bin": "binned", "type": "quantitative",
                  "title": "log p(ground truth) − log p(top dispreferred)"},
            "x2": {"field": "end"},
            "y": {"field": "count", "type": "quantitative", "stack": None, "title": "entries"},
            "color": {"field": "model", "type": "nominal", "sort": models},
        },
    }


def _slug(value: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-") or "x"


def training_plots(name: str, folder: Path) -> PlotGroup:
    """The training curves of one dvclive folder as charts, or a note when it has none."""
    title = TRAINING_RUNS.get(name, name)
    curves = read_curves(folder)
    if not curves:
        why = "does not exist" if not folder.exists() else "holds no dvclive curves (plots/metrics/**.tsv)"
        return PlotGroup(title, str(folder), (), f"No training curves: {folder} {why}.")
    plots = tuple(Plot(metric, render_svg(curve_spec(metric, rows), f"{_slug(name)}-{_slug(metric)}"))
                  for metric, rows in curves.items())
    return PlotGroup(title, str(folder), plots)


def gap_plots(folder: Path) -> PlotGroup:
    """The HSCR Fig. 4 histograms of the `report` stage, one chart per modality, or a note."""
    title = "log-prob gaps on the preference entries (HSCR Fig. 4)"
    tables = read_gap_histograms(folder)
    if not tables:
        why = "does not exist" if not folder.exists() else "holds no histograms (<modality>.csv)"
        return PlotGroup(title, str(folder), (), f"No log-prob gap histograms: {folder} {why}.")
    plots = tuple(Plot(modality, render_svg(gap_spec(modality, rows), f"gap-{_slug(modality)}"))
                  for modality, rows in tables.items())
    return PlotGroup(title, str(folder), plots)


# ---------------------------------------------------------------------------------------------
# The preference entries and the models' answers


def sample_entries(rows: Sequence[Mapping[str, Any]], entries: int, seed: int) -> list[dict]:
    """A seeded sample of `entries` rows (all of them if there are fewer), in file order."""
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(entries, len(rows))))
    return [dict(rows[i]) for i in picked]


Answers = dict[str, dict[str, list[str]]]  # model → "image" | "blind" → one answer per entry


def model_answers(load: Callable[[str], Any], models: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, Any]],
                  batch_size: int, max_new_tokens: MaxNewTokens) -> Answers:
    """Each model's greedy answers to `rows`, with the image and blind (every visual token
    masked), as `evaluate` decodes them (batches of one answer type, each with its cap); each
    model is loaded once and dropped before the next."""
    from pipeline.evaluation import predict

    entries = [dict(r) for r in rows]
    answers: Answers = {}
    for name, folder in models:
        vlm = load(folder)
        answers[name] = {"image": predict(vlm, entries, batch_size, max_new_tokens, blind=False, desc=name),
                         "blind": predict(vlm, entries, batch_size, max_new_tokens, blind=True, desc=f"{name} blind")}
        del vlm
    return answers


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-level BPE alphabet (SmolLM2's tokenizer): every byte is shown as a printable
    # character, a space as "Ġ"; inverting the table gives a token's text.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTES = _byte_decoder()


def token_text(token: str) -> str:
    """A tokenizer's token string as the text it stands for: byte-level BPE (`Ġliver` → ` liver`),
    SentencePiece (`▁liver`), WordPiece continuations (`##er`) and plain words."""
    token = token.removeprefix("##").replace("▁", " ")
    if token and all(c in _BYTES for c in token):
        return bytes(_BYTES[c] for c in token).decode("utf-8", errors="replace")
    return token


def mark_replacements(answer: str, candidate: Mapping[str, Any] | None) -> str:
    """`answer` as HTML with the tokens `sample` put in marked (`<mark>`, the replaced token in its
    title), found left to right in position order; a token not found in the text is left unmarked."""
    if not candidate:
        return text(answer)
    swaps = sorted(zip(candidate.get("positions") or [], candidate.get("original_tokens") or [],
                       candidate.get("replacement_tokens") or [], strict=False))
    out: list[str] = []
    cursor = 0
    for _, original, replacement in swaps:
        surface = token_text(replacement).strip()
        at = answer.lower().find(surface.lower(), cursor) if surface else -1
        if at < 0:
            continue
        out.append(text(answer[cursor:at]))
        out.append(f'<mark title="was: {text(token_text(original).strip())}">{text(answer[at:at + len(surface)])}</mark>')
        cursor = at + len(surface)
    out.append(text(answer[cursor:]))
    return "".join(out)


def image_uri(data: bytes) -> str:
    """Encoded image bytes as a `data:image/png;base64,...` URI (JPEG and other formats converted,
    large images shrunk to MAX_IMAGE_SIDE)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG" and max(image.size) <= MAX_IMAGE_SIDE:
            png = data
        else:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            png = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------------------
# Formatting


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "—"
    value = round(100 * x, 1) + 0.0  # no "-0.0"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return text(x)
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _p(p: float) -> str:
    return "&lt;0.001" if p < 0.001 else f"{p:.3f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> str:
    """An HTML table; `head` is plain text (escaped here), `rows` hold HTML cells."""
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{caption}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{text(h)}</th>" for h in head) + "</tr></thead><tbody>")
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
    out.append("</tbody></table>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Sections


def comparison(tables: Mapping[str, Sequence[Mapping[str, Any]]], seed: int, resamples: int) -> dict[str, Any]:
    """`compare_runs` on the one run of `tables` against `sft` (blind controls against `sft_blind`)."""
    from pipeline.compare import Run, compare_runs

    return compare_runs([Run(config="run", seed=0, tables=tables)], BASELINE, seed=seed, resamples=resamples,
                        alpha=ALPHA)


def _with_ci(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "—"
    ci = row["ci"]
    return f'{_pct(row["mean"])} <span class="ci">[{_pct(ci["low"])}, {_pct(ci["high"])}]</span>'


def _versus(row: Mapping[str, Any] | None) -> tuple[str, str]:
    """The Δ cell (with its interval) and the p cell of a comparison row."""
    if row is None:
        return "—", ""
    v = row["vs_baseline"]
    if v is None:
        return ("baseline" if row["role"] == "baseline" else "no baseline"), ""
    ci = v["ci"]
    delta = f'{_pct(v["difference"], sign=True)} <span class="ci">[{_pct(ci["low"], sign=True)}, {_pct(ci["high"], sign=True)}]</span>'
    test = "McNemar" if v["test"] == MCNEMAR else "permutation"
    p = f"{_p(v['p_value'])} <span class=\"ci\">({test})</span>"
    if v["significant"]:
        return f'<strong class="sig">{delta}</strong>', f'<strong class="sig">{p} ★</strong>'
    return delta, p


def metrics_section(metrics: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """The metric tables: strict metrics with intervals and tests, image reliance, the report's
    deltas, the LLaVA-Med legacy numbers and the log-prob gaps."""
    from pipeline.evaluation import prediction_models

    models = prediction_models(metrics)
    rows = {(r["model"], r["metric"]): r for r in report["rows"]}
    conf = f"{100 * report['confidence']:g}%"
    intro = (f"<p>Values in %, differences in points. {conf} CI: BCa bootstrap over test items "
             f"({report['resamples']} resamples, seed {report['seed']}). Δ: paired difference with "
             f"<code>sft</code> on the same items (a blind control with <code>sft_blind</code>); p: exact McNemar "
             f"(closed accuracy) or paired permutation test, two-sided, no correction for multiple comparisons. "
             f'<strong class="sig">★ marks p &lt; {report["alpha"]:g}</strong>.</p>')
    strict = []
    for model in models:
        cells = [f"<code>{text(model)}</code>"]
        for metric, count in (("closed_accuracy", "n_closed"), ("open_recall", "n_open")):
            row = rows.get((model, metric))
            cells += [str(metrics[model].get(count, "—")), _with_ci(row), *_versus(row)]
        strict.append(cells)
    parts = [intro, _table(["model", "closed n", f"closed accuracy [{conf} CI]", "Δ vs baseline", "p",
                            "open n", f"open recall [{conf} CI]", "Δ vs baseline", "p"], strict,
                           "Strict metrics (pipeline.metrics)")]
    reliance = []
    for model in models:
        cells = [f"<code>{text(model)}</code>"]
        for metric in ("image_reliance_closed_accuracy", "image_reliance_open_recall"):
            row = rows.get((model, metric))
            cells += [_with_ci(row), *_versus(row)]
        if any(rows.get((model, m)) for m in ("image_reliance_closed_accuracy", "image_reliance_open_recall")):
            reliance.append(cells)
    if reliance:
        parts.append(_table(["model", f"closed accuracy [{conf} CI]", "Δ vs sft", "p",
                             f"open recall [{conf} CI]", "Δ vs sft", "p"], reliance,
                            "Image reliance: the model − its blind control (every visual token masked)"))
    deltas = [(key, value) for key, value in metrics.items() if "_minus_" in key and isinstance(value, Mapping)]
    if deltas:
        fields = list(dict.fromkeys(f for _, d in deltas for f in d))
        parts.append(_table(["", *fields], [[f"<code>{text(k)}</code>", *(_pct(d.get(f), sign=True) for f in fields)]
                                            for k, d in deltas], "Deltas of reports/metrics.json, in points"))
    legacy = []
    for model in models:
        old = metrics[model].get("legacy")
        if isinstance(old, Mapping):
            closed = (f'{_pct(old.get("closed_accuracy"))} <span class="ci">({_num(old.get("closed_counted"))}'
                      f'/{_num(old.get("n_closed"))} counted)</span>')
            legacy.append([f"<code>{text(model)}</code>", closed, _pct(old.get("open_recall")),
                           _pct(old.get("open_accuracy")), _num(old.get("n_open"))])
    if legacy:
        parts.append(_table(["model", "closed accuracy (counted / n closed)", "open recall", "open accuracy",
                             "open n"], legacy,
                            "Legacy: LLaVA-Med's run_eval.py, quirks included (closed answers with neither yes nor "
                            "no are not counted), for comparison with published tables"))
    gaps = [(key.removesuffix("_logprob_gap"), value) for key, value in metrics.items()
            if key.endswith("_logprob_gap") and isinstance(value, Mapping)]
    if gaps:
        parts.append(_table(["model", "mean", "median", "entries"],
                            [[f"<code>{text(m)}</code>", _num(g.get("mean")), _num(g.get("median")), _num(g.get("n"))]
                             for m, g in gaps],
                            "Log-prob gap log p(ground truth) − log p(hallucinated candidate) on held-out test entries, "
                            "candidates sampled by the SFT model as in `sample` (larger: the model separates them "
                            "better)"))
    for note in report.get("notes", []):
        parts.append(f"<p class=\"note\">{text(note)}</p>")
    return "\n".join(parts)


def plots_section(groups: Sequence[PlotGroup]) -> str:
    out = []
    for group in groups:
        out.append(f"<h3>{text(group.title)} <span class=\"ci\">{text(group.source)}</span></h3>")
        if group.note:
            out.append(f'<p class="note">{text(group.note)}</p>')
            continue
        out.append('<div class="plots">' + "".join(
            f'<figure class="plot">{p.svg}<figcaption>{text(p.title)}</figcaption></figure>' for p in group.plots)
            + "</div>")
    return "\n".join(out)


def _transcript(raw: str | None) -> str:
    """A judge consensus transcript (a JSON list of turns, `pipeline.judges.consensus`) in a <details>."""
    if not raw:
        return '<span class="ci">no transcript</span>'
    try:
        turns = json.loads(raw)
    except json.JSONDecodeError:
        turns = None
    if not isinstance(turns, list):
        return f"<details><summary>transcript</summary><pre>{text(raw)}</pre></details>"
    items = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            items.append(f"<li><pre>{text(json.dumps(turn, ensure_ascii=False))}</pre></li>")
            continue
        shown = turn.get("shown")
        agree = (f" (shown {text(shown.get('judge'))}'s {text(shown.get('score'))})"
                 if isinstance(shown, Mapping) else "")
        score = "missing" if turn.get("score") is None else text(turn.get("score"))
        line = (f"<li>round {text(turn.get('round'))}, <strong>{text(turn.get('judge'))}</strong>{agree}: "
                f"score {score}")
        if turn.get("reason"):
            line += f" — {text(turn['reason'])}"
        attempts = turn.get("answers") or []
        errors = turn.get("errors") or []
        if attempts or errors:
            line += ("<pre>" + text("\n".join(f"answer: {a}" for a in attempts)
                                    + "".join(f"\nrejected: {e}" for e in errors)) + "</pre>")
        items.append(line + "</li>")
    return f"<details><summary>transcript ({len(turns)} turns)</summary><ol>{''.join(items)}</ol></details>"


def _rationale(value: Mapping[str, Any] | None) -> str:
    if not value or not value.get("text"):
        return ""
    return f'{text(value["text"])} <span class="ci">({text(value.get("judge") or "")})</span>'


def _scored(prediction: str, row: Mapping[str, Any]) -> str:
    """A model's answer with its score against the chosen answer, as `evaluate` scores it."""
    from pipeline.metrics import score_prediction

    score = score_prediction(prediction, row["answer"], row["answer_type"])
    mark = "✓" if score >= 1 else "✗" if score <= 0 else f"recall {score:.2f}"
    return f'{text(prediction)} <span class="{"ok" if score >= 1 else "ci"}">{mark}</span>'


def entry_block(index: int, row: Mapping[str, Any], candidates: Mapping[str, Mapping[str, Any]],
                answers: Mapping[str, Mapping[str, Sequence[str]]]) -> str:
    """One preference entry: image, question, chosen answer, dispreferred answers (marked, with
    their judges' verdicts), the visual dispreferred x* and every model's answers."""
    facts = " · ".join(text(row.get(k, "")) for k in ("modality", "question_type", "answer_type"))
    out = [f'<article class="entry" id="entry-{index}">',
           f'<h3>{index}. <code>{text(row["id"])}</code> <span class="ci">{facts}</span></h3>',
           '<div class="entry-body"><figure class="image">',
           f'<img src="{image_uri(row["image"])}" alt="the entry\'s image"><figcaption>image x</figcaption></figure>']
    visual = row.get("visual_dispreferred")
    if visual and visual.get("image"):
        weight = "—" if visual.get("weight") is None else _num(visual["weight"])
        out.append(f'<figure class="image"><img src="{image_uri(visual["image"])}" alt="the noised image x*">'
                   f'<figcaption>visual dispreferred x*: {text(visual.get("region"))}, '
                   f'{_pct(visual.get("region_fraction"))}% noised, confidence {_num(visual.get("confidence"))}, '
                   f"weight {weight}</figcaption></figure>")
    out.append("<div>")
    context = row.get("context") or []
    if context:  # a multi-turn entry: the earlier turns its question follows
        turns = "".join(f'<li>{text(t["question"])} <span class="ci">→ {text(t["answer"])}</span></li>'
                        for t in context)
        out.append(f'<ol class="context" title="earlier turns of the conversation">{turns}</ol>')
    out.append(f'<p class="question"><strong>Q:</strong> {text(row["question"])}</p>')
    chosen = f'<p><strong>Chosen:</strong> <span class="chosen">{text(row["answer"])}</span>'
    rationale = _rationale(row.get("rationale"))
    out.append(chosen + (f'<br><span class="rationale">why: {rationale}</span>' if rationale else "") + "</p>")
    if answers:
        model_rows = [[f"<code>{text(m)}</code>", _scored(a["image"][index - 1], row), _scored(a["blind"][index - 1], row)]
                      for m, a in answers.items()]
        out.append(_table(["model", "answer with the image", "blind (no image)"], model_rows))
    out.append("</div></div>")
    judgements = row.get("judgements") or []
    counterfactuals = row.get("counterfactuals") or []
    rejected_rows = []
    for j, rejected in enumerate(row.get("rejected") or []):
        verdict = judgements[j] if j < len(judgements) and judgements[j] else {}
        candidate = candidates.get(rejected["text"])
        marked = mark_replacements(rejected["text"], candidate)
        if candidate and candidate.get("replacement_tokens"):
            swaps = ", ".join(f"{text(token_text(o).strip())} → {text(token_text(r).strip())}"
                              for o, r in zip(candidate.get("original_tokens") or [],
                                              candidate["replacement_tokens"], strict=False))
            marked += f'<br><span class="ci">replaced: {swaps}</span>'
        counter = _rationale(counterfactuals[j] if j < len(counterfactuals) else None)
        if counter:
            marked += f'<br><span class="rationale">for it: {counter}</span>'
        agreed = ("agreed" if verdict.get("agreed") else "no consensus") if verdict else ""
        rounds = f", {verdict['rounds']} rounds" if verdict.get("rounds") is not None else ""
        rejected_rows.append([
            str(j + 1), f'<span class="dispreferred">{marked}</span>', _num(rejected.get("similarity")),
            _num(rejected.get("level")), _num(verdict.get("score")) + f'<br><span class="ci">{agreed}{rounds}</span>',
            _num(verdict.get("weight")), _transcript(verdict.get("transcript")),
        ])
    if rejected_rows:
        out.append(_table(["#", "dispreferred answer (replaced tokens marked)", "similarity", "level", "judge score",
                           "weight", "consensus"], rejected_rows))
    else:
        out.append('<p class="note">No dispreferred answer kept for this entry.</p>')
    out.append("</article>")
    return "\n".join(out)


def preferences_section(entries: Sequence[Mapping[str, Any]], total: int, candidates: Sequence[Mapping[str, Any]],
                        answers: Answers, seed: int) -> str:
    """The browser of the sampled entries; `candidates` are `sample`'s rows, joined on id and text."""
    by_entry: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in candidates:
        by_entry.setdefault(row["id"], {}).update({c["text"]: c for c in row.get("candidates") or []})
    intro = (f"<p>{len(entries)} of the {total} entries of the preference data (seeded sample, seed {seed}). "
             "Chosen: the ground truth; each dispreferred answer with its similarity to it and level (how many "
             "sensitive tokens <code>sample</code> replaced; <mark>marked</mark>), the judges' score, its weight in "
             "training and the consensus transcript. The models answer as <code>evaluate</code> does (greedy), "
             "with the image and blind.</p>")
    blocks = [entry_block(i, row, by_entry.get(row["id"], {}), answers) for i, row in enumerate(entries, start=1)]
    return intro + "\n".join(blocks)


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; margin: 0 auto; max-width: 1200px; padding: 0 1.5em; }
header, footer { border-bottom: 1px solid #ccc; padding: 0.5em 0; }
footer { border-top: 1px solid #ccc; border-bottom: none; margin-top: 3em; color: #555; font-size: 13px; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #4a7ab5; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; }
dl.facts { display: grid; grid-template-columns: repeat(3, max-content minmax(6em, max-content)); gap: 0.2em 0.8em; }
dl.facts dd { margin: 0 1.5em 0 0; }
table { border-collapse: collapse; margin: 0.8em 0 1.5em; font-size: 14px; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #eef2f7; }
tbody tr:nth-child(even) { background: #fafafa; }
.ci { color: #666; font-size: 12px; }
.sig { color: #b3261e; }
.ok { color: #2e7d32; font-weight: 600; }
.note { background: #fff6d5; border-left: 4px solid #e0b400; padding: 0.4em 0.8em; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plot { margin: 0; } .plot svg { max-width: 100%; height: auto; }
figcaption { font-size: 13px; color: #444; text-align: center; }
.entry { border: 1px solid #ccc; border-radius: 6px; padding: 0.5em 1em; margin: 1.5em 0; }
.entry-body { display: flex; gap: 1.5em; align-items: flex-start; flex-wrap: wrap; }
.image { margin: 0; } .image img { width: 192px; image-rendering: pixelated; border: 1px solid #999; }
.chosen { background: #dff3e0; padding: 0 0.3em; }
mark { background: #ffd54f; padding: 0 0.15em; }
.rationale { color: #555; font-style: italic; }
details pre, details li { font-size: 12px; white-space: pre-wrap; }
pre { margin: 0.2em 0; }
"""


def build_page(*, config: HtmlReportConfig, metrics: Mapping[str, Any],
               tables: Mapping[str, Sequence[Mapping[str, Any]]], plots: Sequence[PlotGroup],
               entries: Sequence[Mapping[str, Any]], total_entries: int, candidates: Sequence[Mapping[str, Any]],
               answers: Answers, sources: Mapping[str, str]) -> str:
    """The whole page as one HTML string (see the module doc).

    `tables` are the prediction tables of the model keys of `metrics`; `entries` the sampled
    preference rows (of `total_entries`), `answers` every model's answers to them; `sources` the
    input paths by what they are, for the header. Raises RuntimeError (a bug) if the page would
    reference anything outside itself.
    """
    report = comparison(tables, config.seed, config.bootstrap_resamples)
    facts = "".join(f"<dt><code>{text(k)}</code></dt><dd><code>{text(json.dumps(v))}</code></dd>"
                    for k, v in config.run_facts.items())
    inputs = [[text(k), f"<code>{text(v)}</code>"] for k, v in sources.items()]
    base = metrics.get("sft", {}) if isinstance(metrics.get("sft"), Mapping) else {}
    summary = (f"Test split: {_num(base.get('n_closed'))} closed and {_num(base.get('n_open'))} open questions. "
               f"Preference data: {total_entries} entries, {len(entries)} shown. "
               f"Models: {', '.join(f'<code>{text(m)}</code>' for m in answers) or '—'}.")
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>medalign run report</title>",
        f"<style>{STYLE}</style></head><body>",
        '<header id="run"><h1>medalign run report</h1>',
        f"<p>{summary}</p>",
        '<nav><a href="#metrics">Metrics</a><a href="#plots">Plots</a><a href="#preferences">Preference data</a></nav>',
        f'<p><strong>What run this is</strong> (the params.yaml keys that define it):</p><dl class="facts">{facts}</dl>',
        "<details><summary>What the page was built from</summary>",
        _table(["input", "path"], inputs),
        "</details></header>",
        '<section id="metrics"><h2>Metrics</h2>', metrics_section(metrics, report), "</section>",
        '<section id="plots"><h2>Plots</h2>', plots_section(plots), "</section>",
        '<section id="preferences"><h2>Preference data</h2>',
        preferences_section(entries, total_entries, candidates, answers, config.seed), "</section>",
        f"<footer>Generated offline by the <code>html_report</code> stage of medalign: one self-contained file "
        f"with no scripts and no network access (images inline as data URIs; charts rendered to SVG at build "
        f"time by vl-convert {text(version('vl-convert-python'))}, Vega-Lite specs). Open it in any browser, "
        f"from disk or an attachment.</footer>",
        "</body></html>",
    ]
    page = "\n".join(body) + "\n"
    problems = external_references(page)
    if problems:
        raise RuntimeError(f"the page references outside resources: {problems[:5]}")
    return page
