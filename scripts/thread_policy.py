"""A deployed W8A8 layer and its FP32 peer when the machine is shared: OpenMP's default spin-waiting
against OMP_WAIT_POLICY=PASSIVE, one and two threads. Each setting runs in its own process (the policy
is read when the OpenMP runtime loads), settings interleaved over rounds; medians of 20 calls each.

    python scripts/thread_policy.py [--rounds 2]     # start other busy processes first to share the cores
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = (("1", None), ("2", None), ("2", "PASSIVE"))
CHILD = """
import json, statistics, time, torch
from treeq.deploy.integer import IntLinear
from treeq.quant.linear import QuantLinear
torch.manual_seed(0)
linear, x = torch.nn.Linear(1152, 4608), torch.randn(256, 1152)   # DiT-XL/2 fc1, one image
layer = QuantLinear.from_linear(linear, activations="dynamic")
layer.set_bits(8, 8)
deployed = IntLinear.from_quant_linear(layer).deploy_("auto")
def median_ms(f):
    f()
    times = []
    for _ in range(20):
        start = time.perf_counter(); f(); times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
with torch.no_grad():
    print(json.dumps({"fp32_ms": median_ms(lambda: linear(x)), "w8a8_ms": median_ms(lambda: deployed(x))}))
"""


def run(threads, policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = threads
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    results = {setting: [] for setting in SETTINGS}
    for _ in range(rounds):
        for setting in SETTINGS:
            results[setting].append(run(*setting))
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, {time.strftime('%H:%M:%S')}")
    for (threads, policy), rows in results.items():
        fp32, w8a8 = ([row[key] for row in rows] for key in ("fp32_ms", "w8a8_ms"))
        print(f"threads {threads} wait policy {policy or 'default':8} fp32 {statistics.median(fp32):6.1f} ms "
              f"({min(fp32):.1f}-{max(fp32):.1f})  w8a8 {statistics.median(w8a8):6.1f} ms ({min(w8a8):.1f}-{max(w8a8):.1f})")


if __name__ == "__main__":
    main()
