# Sourced by the device scripts (service_speed.sh, grpc_speed.sh) once $R, their run folder,
# exists: the carried wheels (WHEELS, default .gpu-wheels) into /tmp/site, wrk and its
# libraries from .gpu-debs, and the device's name and driver in $R/device.txt.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ${WHEELS:-.gpu-wheels}/*.whl \
  >"$R/pip.log" 2>&1 || { tail "$R/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:.
bash loadtest/unpack_debs.sh /tmp/debs >/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/device.txt"
