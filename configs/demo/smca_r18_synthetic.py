# The demo job (`make demo`): SMCA single-scale trained from scratch on the CPU on the generated
# shapes dataset (datasets/prepare_synthetic.py: 4000 training images), evaluated with
# COCOEvaluator every 750 iterations (the learning curve of tools/demo_report.py).
# The small model of configs/common/r18_synthetic.py, changed for the demo's budget on 2 cores
# (docs/DEMO_HISTORY.md has the measurements behind each change):
# * res3 features (stride 8) instead of res4 (stride 16): the objects are 12..60 px in ~128 px
#   images, and an 8x8 map is too coarse to place the small ones;
# * a half-width ResNet-18 (stem and res2 of 32 channels, res3 of 64; its two other stages are
#   not used): the full width costs 1.7x the time per step for little AP at equal iterations;
# * a decoder of width 64 (4 heads, FFN 256) and no encoder layer: the backbone features go
#   straight to the SMCA decoder, whose modulated co-attention is what SMCA adds;
# * lr 8e-4 instead of 2e-4, no dropout, the backbone in channels-last memory format;
# * two training aids that are not in the paper and leave the inference model as it is: two
#   groups of denoising queries (DN-DETR) and the varifocal class loss (a matched query's class
#   target is the IoU of its box): with both, 3000 iterations reach about the AP that 4000 reached
#   without them (docs/GETTING_STARTED.md describes both);
# * batches of images of one size (rounded up to 16 px): the flips keep image sizes, so a batch
#   is padded much less than with the aspect-ratio grouping;
# * the data loaded in the training process: on 2 cores a loader process takes CPU time from
#   the training threads; the decoded images are kept in memory (about 200 MB), so that only the
#   first epoch reads and decodes them.
from smca_d2.modeling import DenoisingQueries

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock

from ..common.r18_synthetic import dataloader, model, optimizer, train
from ..common.schedule import step_schedule

WIDTH = 32
model.backbone.stem = L(BasicStem)(in_channels=3, out_channels=WIDTH, norm="BN")
model.backbone.stages = [
    L(ResNet.make_stage)(
        block_class=BasicBlock, num_blocks=2, stride_per_block=[1, 1], in_channels=WIDTH, out_channels=WIDTH, norm="BN"
    ),
    L(ResNet.make_stage)(
        block_class=BasicBlock,
        num_blocks=2,
        stride_per_block=[2, 1],
        in_channels=WIDTH,
        out_channels=2 * WIDTH,
        norm="BN",
    ),
]
model.backbone.out_features = ["res3"]
model.in_features = ["res3"]
model.transformer.encoder.num_layers = 0
model.transformer.decoder.d_model = 64
model.transformer.decoder.nhead = 4
model.transformer.decoder.dim_feedforward = 256
model.transformer.decoder.dropout = 0.0
train.speedups.channels_last = True
model.size_divisibility = 16
model.denoising = L(DenoisingQueries)(
    num_classes="${..num_classes}", d_model="${..transformer.decoder.d_model}", num_groups=2
)
model.criterion.class_loss = "varifocal"

dataloader.train.size_grouping = 16
dataloader.train.num_workers = 0
dataloader.train.mapper.image_cache_mb = 512

optimizer.lr = 8e-4

train.max_iter = 3000
train.eval_period = 750
train.checkpointer.period = 750
train.output_dir = "output/demo"
lr_multiplier = step_schedule(train.max_iter)
