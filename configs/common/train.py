# Training-loop settings read by train_net.py.
train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=90000,
    # Mixed precision (smca_d2/engine/amp.py): precision None is float16 on CUDA, bfloat16 on
    # the CPU; or "float16" / "bfloat16".
    amp=dict(enabled=False, precision=None),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    # Exponential moving average of the weights (smca_d2/engine/ema.py): updated every iteration,
    # evaluated instead of the trained weights, saved as "model_ema" in the checkpoints and used
    # by --eval-only and LazyPredictor. The decay settles to `decay` ((1 + t) / (10 + t) before).
    ema=dict(enabled=False, decay=0.9998),
    eval_period=5000,
    log_period=20,
    device="cuda",
    # Speed-ups applied to the built model (smca_d2/speedups/), none of which changes what is
    # trained: frozen BN applied to the conv weights; on the CPU, the frozen stem's max pool in
    # channels-last format, cheap dropout masks (same distribution, another random stream) and
    # glibc malloc keeping freed memory for the next iteration; the backbone in channels-last
    # memory format (off: not reliably faster for R50 training, see docs/BENCHMARKS.md).
    speedups=dict(
        fuse_frozen_bn=True,
        fast_cpu_stem=True,
        fast_cpu_dropout=True,
        channels_last=False,
        keep_freed_cpu_memory=True,
    ),
    seed=-1,
    # Loading train.init_checkpoint (or --eval-only weights): True refuses a checkpoint whose
    # tensors do not all fit the model; False loads what fits and lists the rest.
    strict_load=False,
)
