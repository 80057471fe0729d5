"""
GPT vs Alcoholic (or any registered architectures), fairly: runs.py plans, trains and evaluates the runs a comparison
needs, report.py turns their records into compare.md and compare.png, study.py puts the two together for
scripts/compare.py.
"""
