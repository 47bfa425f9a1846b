"""Compute and memory of compiled XLA programs, and device peaks.

One place for the numbers every report needs: FLOPs from XLA's cost analysis,
bytes from XLA's memory analysis of the compiled executable (the honest peak
on CPU, where there is no allocator to ask), and the allocator's peak bytes
in use on GPU/TPU.
"""
from __future__ import annotations

import os

import jax


def compiled_flops(compiled) -> float:
  """FLOPs XLA counts for one call of a compiled executable (0 if unknown)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def compiled_memory(compiled) -> dict:
  """Bytes from XLA's memory analysis of a compiled executable.

  peak_bytes counts what the program holds at once beyond its inputs:
  temporaries plus outputs (outputs aliased to donated inputs excluded).
  """
  m = compiled.memory_analysis()
  if m is None:
    return {'temp_bytes': 0, 'output_bytes': 0, 'argument_bytes': 0,
            'alias_bytes': 0, 'peak_bytes': 0}
  temp, out = int(m.temp_size_in_bytes), int(m.output_size_in_bytes)
  args, alias = int(m.argument_size_in_bytes), int(m.alias_size_in_bytes)
  return {'temp_bytes': temp, 'output_bytes': out, 'argument_bytes': args,
          'alias_bytes': alias, 'peak_bytes': temp + out - alias}


def device_peak_bytes(device=None) -> int | None:
  """Allocator peak bytes in use on this process's first GPU/TPU; None
  where not reported (CPU)."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if not stats:
    return None
  return int(stats.get('peak_bytes_in_use', 0)) or None


def device_kind() -> str:
  d = jax.devices()[0]
  return f'{d.platform}:{d.device_kind}'


def host_available_bytes() -> int:
  """MemAvailable on Linux (what can be allocated without swapping), else
  total RAM."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def available_bytes(device=None) -> int | None:
  """Bytes the next program may allocate on `device`: the allocator's limit
  minus what is in use on GPU/TPU, the host's available memory on CPU."""
  device = device or jax.local_devices()[0]
  if device.platform == 'cpu':
    return host_available_bytes()
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if not stats or 'bytes_limit' not in stats:
    return None
  return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
