# Sourced at the start of every command on the GPU machine (which has no registry): install the carried
# wheels, point the data at the carried copy of DRIVE.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export DRIVE=.data/DRIVE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
