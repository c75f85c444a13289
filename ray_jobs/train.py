"""`ray job submit` entrypoint for training: the same arguments as `multimix train`.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- \
        python ray_jobs/train.py --config paper \
        --set data.cls_data=s3://bucket/kermany-256 --set data.seg_data=s3://bucket/v7-256 \
        --set run.storage_path=s3://bucket/runs --set scaling.num_workers=4 --evaluate

Inside the job RAY_ADDRESS points at the cluster, so the trainer joins it. Re-submitting the same
command (same run.name and run.storage_path) resumes from the latest checkpoint.
"""

import sys

from multimix.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
