"""``colld experiment NAME``: named grids of distillation runs, evaluated and summarised.

grid.py     the grid config (configs/experiments/NAME.yaml): schema, validation, each cell's
            RunConfig at each seed, and where everything goes on disk
summary.py  result files -> one row per cell (mean ± std over distillation seeds), the claims'
            verdicts, and the results page (docs/results/NAME.md)
plots.py    the page's figures: per-task bars and score vs parameters, with seed error bars
runner.py   the resumable loop: target cache, references, each cell x seed, then the page
"""
