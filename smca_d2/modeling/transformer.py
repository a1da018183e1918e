"""Encoder + decoder, initialised as in the official SMCA code."""

from torch import nn

from .encoder import DecoderLevels


class SMCATransformer(nn.Module):
    """Holds the encoder and the decoder (``transformer.encoder`` / ``transformer.decoder`` in
    checkpoints, as in the official code).

    Matrices are Xavier-uniform initialised; the Gaussian scale predictors start at scale 1.
    """

    def __init__(self, *, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.decoder.layers:
            layer.reset_scale_parameters()

    @property
    def d_model(self) -> int:
        return self.decoder.norm.normalized_shape[0]

    def forward(self, src, pos, key_padding_mask, query_embed, level_shapes, level_strides, image_wh, denoising=None):
        """
        Args:
            src, pos: [B, S, C] flattened feature levels (concatenated) and their encodings.
            key_padding_mask: bool [B, S], True on padded tokens, or None (no padding).
            query_embed: [Q, C] learned queries.
            level_shapes, level_strides: per level (H_l, W_l) and stride in pixels.
            image_wh: float [B, 2] unpadded image sizes (width, height).
            denoising: training only, denoising queries for the decoder (it then returns
                ``Q + D`` queries), or None.

        Returns:
            hs [num_dec_layers, B, Q, C], ref_logit [B, Q, 2]
        """
        memory = self.encoder(src, pos, key_padding_mask, level_shapes)
        if isinstance(memory, DecoderLevels):  # the decoder attends to other levels (ConvMultiScaleEncoder)
            memory, pos, key_padding_mask, level_shapes, level_strides = memory.gather(
                pos, key_padding_mask, level_shapes, level_strides
            )
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        args = (memory, pos, query_pos, key_padding_mask, level_shapes, level_strides, image_wh)
        if denoising is None:  # decoders without denoising support are called as before
            return self.decoder(*args)
        return self.decoder(*args, denoising=denoising)
