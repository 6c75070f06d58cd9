"""Entry points only: the `rae-scale` CLI (cli.py), the job functions it and the quickstart call
(jobs.py), sampling and FID (generate.py), checkpoint conversion (convert.py) and the quickstart."""
