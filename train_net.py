#!/usr/bin/env python
"""Train and evaluate SMCA-DETR (or any detectron2 LazyConfig model, model-zoo ones as they are).

    python train_net.py --config-file configs/smca_single_scale_r50_50ep.py --num-gpus 8
    python train_net.py --config-file CONFIG --eval-only train.init_checkpoint=model.pth
    python train_net.py --config-file CONFIG --resume            # continue in train.output_dir

The config must hold ``model``, ``dataloader`` (``train``, ``test``, ``evaluator``), ``optimizer``
(whose ``params.model`` is set here), ``lr_multiplier`` (a ParamScheduler) and ``train`` (see
configs/common/train.py). A config written for detectron2 (a model-zoo file) runs too, adapted
by :func:`~smca_d2.engine.adapt_foreign_config`, and each change is logged: the ``train`` options
that detectron2's ``configs/common/train.py`` lacks (``train.seed``, ``train.ema``,
``train.amp.precision``, ``train.speedups``, ``train.strict_load``) are added with
their defaults, the seed ``-1`` (random, as detectron2's ``default_setup`` has it; see
:class:`~smca_d2.engine.DeterministicSteps`); and its dataset function, mapper and training loader,
if detectron2's, become smca_d2's validating / resumable drop-ins, unless ``--data-as-written``.
The configs under configs/ name what runs and are not changed. ``key=value`` overrides follow the
flags; a key that is not in the config is refused (``+key=value`` adds one on purpose).

Before any work the config, the datasets (files, json, boxes, images) and the model's class count
(``model.num_classes``, ``model.roi_heads.num_classes``, ... wherever the model keeps it) are
checked; checkpoints are loaded without running code from them and written atomically;
with ``train.ema.enabled=True`` a moving average of the weights is kept, evaluated and saved
(``"model_ema"`` in each checkpoint) and ``--eval-only`` loads it;
training stops at a non-finite loss; ``--resume`` continues exactly where the last complete
checkpoint left off. See "What happens when" in README.md.
"""

import contextlib
import logging
import sys

import torch

import smca_d2  # noqa: F401  (compatibility fixes, registrations)
from smca_d2.checkpoint import (
    EMA_KEY,
    CheckpointUnavailableError,
    CheckpointWriteError,
    DamagedCheckpointError,
    SafeCheckpointer,
)
from smca_d2.compat import create_ddp_model
from smca_d2.engine import (
    DEFAULT_PEER_TIMEOUT,
    AMPTrainer,
    DeterministicSteps,
    DistributedJobError,
    EMAHook,
    MetricsWriteError,
    ModelEMA,
    NonFiniteLossCheck,
    PeriodicWriter,
    amp_dtype,
    check_config_datasets,
    check_device,
    check_num_classes,
    describe_config_changes,
    inference_autocast,
    inference_dtype,
    launch,
    load_config,
    use_ema_weights,
)
from smca_d2.inference import untrained_keys, warn_if_untrained
from smca_d2.model_zoo import ConfigNotFoundError
from smca_d2.speedups import apply_speedups

from detectron2.config import instantiate
from detectron2.engine import SimpleTrainer, default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

logger = logging.getLogger("smca_d2")


def do_test(cfg, model, test_loader=None, ema=None, autocast_dtype=None):
    """Evaluate ``model`` (with the averaged weights of ``ema`` when given; under autocast of
    ``autocast_dtype`` when given)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    if test_loader is None:
        test_loader = instantiate(cfg.dataloader.test)
    weights = contextlib.nullcontext()
    if ema is not None:
        logger.info(f"Evaluating the averaged (EMA) weights, {ema.num_updates} updates")
        weights = ema.weights_in_model()
    with weights, inference_autocast(torch.device(cfg.train.device).type, autocast_dtype):
        results = inference_on_dataset(model, test_loader, instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def eval_autocast_dtype(cfg):
    """``--eval-only`` with ``train.amp.enabled=True`` evaluates under autocast of
    ``train.amp.precision`` (bfloat16 on the CPU by default; float32 on a CPU without bfloat16
    instructions, with a warning). Evaluations during training run in float32."""
    if not cfg.train.amp.enabled:
        return None
    device_type = torch.device(cfg.train.device).type
    name = str(amp_dtype(device_type, cfg.train.amp.precision)).replace("torch.", "")
    dtype = inference_dtype(device_type, name)
    if dtype is not None:
        logger.info(f"Evaluating under {name} autocast (train.amp.enabled=True)")
    return dtype


def do_train(args, cfg):
    # The datasets are loaded (and validated) before the model is built.
    train_loader = instantiate(cfg.dataloader.train)
    test_loader = instantiate(cfg.dataloader.test) if "evaluator" in cfg.dataloader else None
    check_num_classes(cfg)

    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info("Model:\n%s", model)
    apply_speedups(model, cfg.train.speedups, device=cfg.train.device, training=True)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)

    model = create_ddp_model(model, **cfg.train.ddp)
    if cfg.train.amp.enabled:
        trainer = AMPTrainer(
            model,
            train_loader,
            optimizer,
            device_type=torch.device(cfg.train.device).type,
            precision=cfg.train.amp.precision,
        )
    else:
        trainer = SimpleTrainer(model, train_loader, optimizer)
    ema = ModelEMA(model, cfg.train.ema.decay) if use_ema_weights(cfg) else None
    checkpointer = SafeCheckpointer(
        model,
        cfg.train.output_dir,
        strict=cfg.train.strict_load,
        trainer=trainer,
        **({EMA_KEY: ema} if ema is not None else {}),
    )
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            DeterministicSteps(cfg.train.seed, train_loader),
            NonFiniteLossCheck(checkpointer),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            EMAHook(ema) if ema is not None else None,  # before the checkpointer and the evaluation
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, test_loader, ema)),
            PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--data-as-written",
        action="store_true",
        help="run the dataset function, mapper and training loader that the config names even when "
        "they are detectron2's (by default smca_d2's validating / resumable drop-ins replace them)",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=DEFAULT_PEER_TIMEOUT,
        metavar="SECONDS",
        help="in a multi-process job, a process that has not answered for this long counts as lost and "
        "every process stops, naming it (default: %(default)s; 0: wait for the collectives' own timeout)",
    )
    return parser


def main(args):
    cfg, changes = load_config(
        args.config_file, args.opts, replace_data_functions=not args.data_as_written, return_changes=True
    )
    check_device(cfg.train.device)
    if cfg.train.amp.enabled:
        amp_dtype(torch.device(cfg.train.device).type, cfg.train.amp.precision)
    check_config_datasets(cfg, splits=("test",) if args.eval_only else ("train", "test"))
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, comm.get_rank(), name="smca_d2", abbrev_name="smca")
    if changes:
        logger.info(describe_config_changes(changes))
    if args.eval_only:
        model = instantiate(cfg.model).to(cfg.train.device)
        model = create_ddp_model(model)
        bare = model.module if hasattr(model, "module") else model
        checkpointer = SafeCheckpointer(model, strict=cfg.train.strict_load, ema_weights=use_ema_weights(cfg))
        checkpointer.load(cfg.train.init_checkpoint)
        warn_if_untrained(bare, untrained_keys(checkpointer), cfg.train.init_checkpoint)
        apply_speedups(bare, cfg.train.speedups, device=cfg.train.device, training=False)
        return do_test(cfg, model, autocast_dtype=eval_autocast_dtype(cfg))
    do_train(args, cfg)


if __name__ == "__main__":
    args = argument_parser().parse_args()
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            peer_timeout=args.peer_timeout,
        )
    except (
        ConfigNotFoundError,
        CheckpointUnavailableError,
        CheckpointWriteError,
        DamagedCheckpointError,
        MetricsWriteError,
    ) as e:  # a path or a disk to fix, not a bug
        sys.exit(f"train_net.py: {e}")
    except DistributedJobError as e:  # the processes' own logs say more
        sys.exit(f"train_net.py: {e} Continue from the last complete checkpoint with --resume.")
