"""`rerank` stage: similarity-aware re-ranking of the sampled candidates (HSCR §3.2)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import DataError
from pipeline.models.sources import check_model_source
from pipeline.params import load_config
from pipeline.reporting import write_json
from pipeline.rerank import PACKAGED_ALIASES, RerankConfig, load_embedder, rerank
from pipeline.schema import CANDIDATES_SCHEMA, RANKED_SCHEMA, read_rows, require_rows, write_rows
from pipeline.stages._cli import input_option, metrics_option, output_option, params_option, run, stage_app

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    params: Path = params_option("rerank"),
    input: Path = input_option("candidates from `sample` (Parquet)"),
    output: Path = output_option("entries with their ranked rejected responses (Parquet)"),
    metrics: Path = metrics_option(),
    model_root: Path = input_option("folder that holds local embedders (a dep of this stage)", "--model-root"),
) -> None:
    config = load_config(RerankConfig, params, "rerank")
    check_model_source(config.model, "rerank.model", model_root, packaged=PACKAGED_ALIASES)
    rows = require_rows(read_rows(input, CANDIDATES_SCHEMA), input)
    embedder = load_embedder(config.model)
    ranked, report = rerank(rows, embedder, config, show_progress=True)
    write_json(metrics, report)  # before the check below, so the reason can be read
    if not ranked:
        raise DataError(
            f"rerank kept no entry of {len(rows)}: every entry has fewer than {report['min_keep']} candidates "
            f"{config.min_gap} apart (selected per entry: {report['selected_per_entry_histogram']}); "
            "lower rerank.min_keep or rerank.min_gap, or sample more candidates (sample.k)"
        )
    write_rows(ranked, output, RANKED_SCHEMA)
    typer.echo(
        f"rerank: {len(ranked)} of {len(rows)} entries kept ({report['dropped_too_few']} with too few candidates); "
        f"{report['removed_equal_to_chosen']} candidates equal to the chosen answer removed -> {output}"
    )


if __name__ == "__main__":
    run(app)
