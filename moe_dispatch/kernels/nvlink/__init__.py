"""Triton kernels of the NVLink (symmetric-memory) token dispatcher, and their launchers.

Files by job (each imports torch, triton and this package only):

* ``wire.py``: the wire format (field positions, ``MAX_PEERS``, dtype codes); pure Python, the
  one module here that imports without triton.
* ``sync.py``: device helpers: peer-pointer selection, flag waits, publish / free of chunks,
  and the send / receive role loops every fused kernel shares.
* ``route.py``: routing metadata (counting sort of the slots) and the layout kernel.
* ``dispatch.py``, ``combine.py``, ``backward.py``: the fused kernels of each operation.
* ``launch.py``: the launchers (allocate outputs, compute grids); the dispatcher calls these.

This ``__init__`` imports nothing, so ``moe_dispatch.kernels.nvlink.wire`` needs no triton;
import ``launch`` lazily: under ``TRITON_INTERPRET=1`` Triton decides how to run the kernels
when they are first imported.

Shape legend: N tokens on this rank, H hidden, K top-k, E experts (global), L = E / P local
experts, P ranks, ``me`` this rank, S slots per source in the staging buffers (capacity),
C = NCHUNK chunk slots per source.

What the kernels exchange (all buffers below live in every rank's workspace; "peer r's X" is a
tensor view mapped onto rank r's memory, a plain tensor of another simulated rank on CPU):

* ``counts [P, CS]`` int32: row s is written by rank s into every rank. Columns
  ``[0, E)`` slots per global expert, ``[E, E + P)`` tokens sent to each rank, then ``N``, the
  number of invalid expert ids, the hidden size and a dtype code. ``count_flags [P]``: rank s
  sets its entry in rank r's flags after writing its row there.
* ``stage rows [P, S, H]`` (hidden dtype) and ``stage meta [P, S, 2K]`` int32: sender s writes
  its token n to receiver r at row ``[s, j]`` where j = ``send_slot[n, r]``, the position of n
  among the tokens s sends to r (token order). Meta holds the token's K destination rows at r
  (-1 for slots on other ranks) and its K weights (fp32 bits).
* ``comb rows [P, S, H]``: receiver r writes, into sender s's buffer at ``[r, j]``, the fp32
  weighted sum over its local slots of token (s, j), rounded to the output dtype.
* ``gw [P, S, K]`` fp32: combine backward returns the weight gradients the same way.
* ``ctl [P, C, 4]`` int32 per channel (stage, comb, gw): ``[flag, first_j, count, -]`` per
  (source, chunk).

Synchronisation (no host sync, no separate barrier kernel, CUDA-graph safe): a sender splits
its tokens into chunks of ``chunk_t`` consecutive tokens (chunk_t is computed on device from the
largest N of any rank, so all ranks agree). For each chunk and each remote receiver it writes
the rows, then ``bar.sync`` + one ``atom.release.sys`` that sets the chunk's flag to 1 in the
receiver's ctl. The receiver spins (``atom.acquire.sys``) until the flag is 1, consumes the
rows, then ``bar.sync`` + release-store of 0: the flag is also the credit that lets the sender
reuse the slot in a later operation (the sender waits for 0 before writing). Flags only ever
toggle 0 -> 1 -> 0, so there is no epoch counter to keep in sync with CUDA-graph replays.
The pattern "all threads store, bar.sync, one thread does a release at system scope" is the one
cooperative-groups' grid sync uses; the reader side is "one thread acquires, bar.sync, all
threads load"; loads of peer-written data use ``.cg`` (L2, never a stale L1 line).

Deadlock freedom: send roles never wait on anything of the current operation (only on credits
of earlier operations, which earlier kernels return); receive roles wait only on send roles.
A fused kernel puts the send role on the low program ids, so it is scheduled first.

Every fused kernel takes ``n_send`` and ``n_recv`` and runs the send role on programs
``[0, n_send)`` and the receive role on ``[n_send, n_send + n_recv)``. On GPU one launch runs
both; the CPU simulation launches the send role of every rank, then the receive role of every
rank (same kernel, same code), so the interpreter never spins on a flag that is not yet set.

Spins are bounded by ``max_spins``: on time-out the kernel sets bit 0 of ``status`` and goes on
(wrong results, no hang); the dispatcher checks ``status`` at its host syncs.
"""
