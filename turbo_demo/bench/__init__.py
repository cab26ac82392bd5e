"""`python -m turbo_demo bench`: the speed of the sparse FFN and of batch-1 decoding, measured.

    machine  read_gbps: memory read bandwidth, the faster of two readers of one large buffer
             (torch.sum over it as fp32, or the kernels' matvec over it as bf16 rows), measured
             first; the moe rows' limits are against it. read_gbps_at_end: the same reading
             after the last row (the machine's drift during the run)
    kernels  each decode kernel alone (bench/kernels.py): GB/s, and share_of_read_bandwidth
             against the row's own read_gbps, the two readers' bandwidth measured in the same
             rounds as the kernels (common.InRounds)
    ffn      ms of one FFN step (batch 1) per mode and sparsity, through the product's FFN
             modes on synthetic dReLU layers, and of the transformers MLP module's own
             forward (PyTorch's GEMVs, HF's weight layout) as the reference users start from;
             speedup = dense ms / mode ms and speedup_vs_transformers = transformers ms /
             mode ms, at the same shape and sparsity
    moe      ms of one MoE step (batch 1) through a few layers of Mixtral's shape: transformers' MoE
             block, our dense MoE, exact and predictor at 85% in-expert sparsity, beside the
             bytes each reads and their time at the read bandwidth (limit_ms; bench/moe.py)
    e2e      tokens/s of decoding per engine: transformers' model.generate, and the lean Runtime
             in the dense, exact and predictor modes, on a Mistral-7B-shaped stack of random
             layers and on the shipped dReLU checkpoint (in the benchmark's dtype, and in fp32,
             the dtype the app runs it in), with
             bandwidth_share = (weight bytes read per token / read_gbps) / seconds per token,
             the row's own read_gbps being the two readers' bandwidth measured in the same
             rounds as the engines (common.InRounds)
             (above 1 where the weights partly fit in the caches, as a small model's do),
             sparsity = the share of FFN neurons whose rows were skipped (1 - computed share)
             and stats_share = the time to build one step's statistics (a LayerRecord per
             layer and the StepStats; the counts in them come from the kernels' own loops) /
             seconds per token, for the lean engines, whose statistics are always on
             and, with Settings.peers, the peers on the same weights (bench/peers.py):
             llama.cpp at f16, q8_0 and q4_0, and transformers+torchao at int8 and int4
    prefill  tokens/s of a prompt's prefill (32 and 512 tokens) per mode and precision on the
             7b-shape stack, beside llama.cpp's at the same precision (bench/phases.py)
    request  a 32-token prompt and 64 new tokens: time to the first token, decode tokens/s and
             the total, ours and llama.cpp's (bench/phases.py)

Fairness. Every number is a median over rounds in which the compared variants take turns, in an
order that rotates each round, so that a slow spell of the machine hits them alike. Caches do
not flatter: the FFN layers cycle through copies adding up to at least `working_set` bytes,
every FFN step gets a fresh input, hence a fresh set of neurons, and each round of FFN steps
starts after reading the `read_bytes` buffer, which evicts the weights (and writes back the
sign flips below, which would otherwise eat into the bandwidth of the timed steps).

Synthetic activity. For the input x of an FFN step, rows of W_gate and W_up are negated (which
negates their outputs exactly) so that h = relu(W_gate x) * relu(W_up x) is non-zero on exactly
the neurons wanted: in exact mode a random (1 - sparsity) share of them; in predictor mode all
of them, so that every neuron the predictor picks (its `budget` = 1 - sparsity best scores) is
truly active and down reads all of their rows, the worst case.
"""
