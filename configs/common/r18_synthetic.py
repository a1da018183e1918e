# SMCA single-scale with a small ResNet-18 trained from scratch on the generated shapes dataset
# (datasets/prepare_synthetic.py) on the CPU: the base of the demo (configs/demo/) and of the
# convergence benchmark (configs/convergence/), which both change the model for speed on the CPU
# (stride-8 features, no encoder layer, no dropout).
# No pretrained weights exist here, so: trainable BN, res4 features (stride 16: the images are
# ~128 px), a narrow transformer and few queries.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.modeling.backbone import ResNet

from .data.coco_detr import dataloader
from .models.smca_single_scale import model
from .optim import AdamW as optimizer
from .schedule import step_schedule
from .train import train

dataloader.train.dataset.names = "smca_synthetic_train"
dataloader.test.dataset.names = "smca_synthetic_val"
dataloader.train.mapper.augmentations = [L(T.RandomFlip)(horizontal=True)]
dataloader.test.mapper.augmentations = []
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.num_workers = 1

model.num_classes = 5
model.backbone.stem.norm = "BN"
model.backbone.stages = L(ResNet.make_default_stages)(depth=18, norm="BN")
model.backbone.out_features = ["res4"]
model.backbone.freeze_at = 0
model.in_features = ["res4"]
model.size_divisibility = 32  # few distinct batch shapes (fast on CPU); masks align with stride 16
model.num_queries = 30
model.test_topk = 100  # of 30 x 5 query-class scores (k = num_queries would keep 30)
model.transformer.encoder.num_layers = 2
model.transformer.decoder.num_layers = 3
model.transformer.decoder.d_model = 128
model.transformer.decoder.dim_feedforward = 512

optimizer.lr = 2e-4
optimizer.params.backbone_lr_factor = 1.0  # trained from scratch: no reason to slow it down

train.device = "cpu"
train.max_iter = 2000
train.eval_period = train.max_iter
train.log_period = 50
train.checkpointer.period = 500
train.output_dir = "output/smca_r18_synthetic"
train.seed = 0
lr_multiplier = step_schedule(train.max_iter)
