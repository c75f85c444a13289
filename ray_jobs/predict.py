"""`ray job submit` entrypoint for batch inference: the same arguments as `multimix predict`.

    ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \
        python ray_jobs/predict.py --ray --checkpoint s3://bucket/runs/multimix \
        --out s3://bucket/pred-nih s3://bucket/nih-256 --num-gpus 1 --batch-size 64

Inside the job RAY_ADDRESS points at the cluster: the read tasks, model actors and writers run
there. Re-submitting the same command writes only the parts that are missing.
"""

import sys

from multimix.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
