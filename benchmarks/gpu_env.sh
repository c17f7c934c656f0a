# Sourced by the scripts that run on the GPU machine (h100.sh, gpu_fsdp_smoke.sh), from the repository root: the
# wheels that machine lacks (.whl/, made here by gpu_wheels.sh; WHEELS=0 skips them), spoctl's sources on
# PYTHONPATH, and PY, the Python to run (default python3).
if [ "${WHEELS:-1}" = 1 ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
