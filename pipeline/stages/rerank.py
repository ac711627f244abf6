"""`rerank` stage: similarity-aware re-ranking of the sampled candidates -> data/ranked.parquet."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.params import load_params, section
from pipeline.reporting import write_json
from pipeline.rerank import RerankConfig, load_embedder, rerank
from pipeline.schema import CANDIDATES_SCHEMA, RANKED_SCHEMA, read_rows, write_rows

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file (reads `rerank:`)"),
    input: Path = typer.Option(Path("data/candidates.parquet"), help="candidates from `sample`"),
    output: Path = typer.Option(
        Path("data/ranked.parquet"), help="entries with their ranked rejected responses"
    ),
    metrics: Path = typer.Option(Path("reports/rerank.json"), help="stage summary"),
) -> None:
    config = RerankConfig.from_section(section(load_params(params), "rerank"))
    rows = read_rows(input, CANDIDATES_SCHEMA)
    embedder = load_embedder(config.model)
    ranked, report = rerank(
        rows,
        embedder,
        j=config.j,
        min_gap=config.min_gap,
        max_similarity=config.max_similarity,
        min_keep=config.min_keep,
        batch_size=config.batch_size,
        show_progress=True,
    )
    report = {
        "model": config.model,
        "j": config.j,
        "min_gap": config.min_gap,
        "max_similarity": config.max_similarity,
        **report,
    }
    write_json(metrics, report)  # before any failure below, so the reason can be read
    if not ranked:
        raise RuntimeError(
            f"rerank kept no entry of {len(rows)}: every entry has fewer than {report['min_keep']} candidates "
            f"{config.min_gap} apart (selected per entry: {report['selected_per_entry_histogram']}); "
            "lower rerank.min_keep or rerank.min_gap, or sample more candidates"
        )
    write_rows(ranked, output, RANKED_SCHEMA)
    typer.echo(
        f"rerank: {len(ranked)} of {len(rows)} entries kept ({report['dropped_too_few']} with too few candidates); "
        f"{report['removed_equal_to_chosen']} candidates equal to the chosen answer removed -> {output}"
    )


if __name__ == "__main__":
    app()
