from posttrain.console import run

raise SystemExit(run())
