"""`ray job submit` entrypoint for data preparation: the same arguments as `multimix prepare`.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \
        python ray_jobs/prepare.py /mnt/data/kermany-cxr --out s3://bucket/kermany-256 --size 256
"""

import sys

from multimix.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
