"""`ray job submit` entrypoint for hyper-parameter search: the same arguments as `multimix tune`.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \
        python ray_jobs/tune.py --config paper --set data.cls_data=s3://bucket/kermany-256 \
        --set data.seg_data=s3://bucket/v7-256 --set run.storage_path=s3://bucket/runs \
        --space data.cls_labeled=choice:100,1000 --num-samples 16 --concurrent 4
"""

import sys

from multimix.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
