"""A study's report: its scaling-law fits printed, plots written as PNG and one
self-contained HTML page, all logged to the study's MLflow parent run. The same
as `lipscale report` (lipscale/report/ has the details).

    python dashboards/report.py studies/specs/digits.yaml      # files under runs/digits/report/
    python dashboards/report.py studies/specs/digits.yaml --out /tmp/report --resamples 1000
"""

import sys

from lipscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
