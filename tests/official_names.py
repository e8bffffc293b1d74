"""Hand-written official parameter names of every method's released network, as tables ``our name ->
official name`` (regex rows for ``checkpoint_helpers.to_official``), each written from reading the
official code (module trees and forward functions cited per table), independently of the converters in
``nnunet_plugins.checkpoints`` (which map the other way). Used by tests/checkpoints and tests/e2e to build
official-format checkpoints of our networks."""

# ours -> official for BA-Net (generic_BANetV2 = nnU-Net v1 Generic_UNet + boundary decoder; 3 stages, 2 convs per
# stage as in these tests): conv_blocks_context.d = StackedConvLayers (blocks.i = ConvDropoutNormNonlin: conv,
# instnorm), the bottleneck = Sequential(StackedConvLayers(1), StackedConvLayers(1)), conv_blocks_localization.u /
# conv_blocks_boundary.u = Sequential(StackedConvLayers(1), StackedConvLayers(1)), tu / tb (transposed convs),
# seg_outputs / bdr_outputs
V1_LAYER = {"conv": "conv", "norm": "instnorm"}
BANET = [
    (r"encoder\.stages\.([01])\.0\.convs\.(\d)\.(conv|norm)\.(weight|bias)",
     lambda m: f"conv_blocks_context.{m[1]}.blocks.{m[2]}.{V1_LAYER[m[3]]}.{m[4]}"),
    (r"encoder\.stages\.2\.0\.convs\.(\d)\.(conv|norm)\.(weight|bias)",
     lambda m: f"conv_blocks_context.2.{m[1]}.blocks.0.{V1_LAYER[m[2]]}.{m[3]}"),
    (r"(decoder|boundary_decoder)\.stages\.(\d)\.convs\.(\d)\.(conv|norm)\.(weight|bias)",
     lambda m: f"{'conv_blocks_localization' if m[1] == 'decoder' else 'conv_blocks_boundary'}.{m[2]}.{m[3]}.blocks.0."
               f"{V1_LAYER[m[4]]}.{m[5]}"),
    (r"decoder\.transpconvs\.(\d)\.weight", r"tu.\1.weight"),
    (r"boundary_decoder\.transpconvs\.(\d)\.weight", r"tb.\1.weight"),
    (r"decoder\.seg_layers\.(\d)\.weight", r"seg_outputs.\1.weight"),
    (r"boundary_decoder\.seg_layers\.(\d)\.weight", r"bdr_outputs.\1.weight"),
]


# ours -> official, from the official ResTranUnet / U_ResTran3D module tree (ResTranUnet.py):
# backbone = ResNet(conv1, norm1, layer1..3 of ResBlock(conv1, norm1, downsample=[conv, norm])),
# encoder_Detrans = DeformableTransformer(level_embed, encoder.layers), transposeconv_stage2..0,
# stage2..0_de = ResBlock(resconv1, resconv2 = Conv-Norm-Act), ds2..0_cls_conv, cls_conv
COTR = [
    (r"backbone\.stem\.conv\.weight", "backbone.conv1.weight"),
    (r"backbone\.stem\.norm\.(weight|bias)", r"backbone.norm1.\1"),
    (r"backbone\.stages\.(\d)\.(\d+)\.conv\.weight", lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.conv1.weight"),
    (r"backbone\.stages\.(\d)\.(\d+)\.norm\.(weight|bias)",
     lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.norm1.{m[3]}"),
    (r"backbone\.stages\.(\d)\.(\d+)\.shortcut\.([01])\.(weight|bias)",
     lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.{m[3]}.{m[4]}"),
    (r"transformer\.level_embed", "encoder_Detrans.level_embed"),
    (r"transformer\.layers\.(.+)", r"encoder_Detrans.encoder.layers.\1"),
    (r"decoder\.upconvs\.(\d)\.weight", lambda m: f"transposeconv_stage{2 - int(m[1])}.weight"),
    (r"decoder\.blocks\.(\d)\.conv([12])\.(conv|norm)\.(weight|bias)",
     lambda m: f"stage{2 - int(m[1])}_de.resconv{m[2]}.{m[3]}.{m[4]}"),
    (r"decoder\.ds_heads\.(\d)\.(weight|bias)", lambda m: f"ds{2 - int(m[1])}_cls_conv.{m[2]}"),
    (r"decoder\.seg_head\.(weight|bias)", r"cls_conv.\1"),
]


# NoBottleneck's layers: gn1, conv1, gn2, conv2, downsample = [GN, ReLU, conv]
INNER = {"norm1": "gn1", "norm2": "gn2", "conv1": "conv1", "conv2": "conv2", "shortcut.0": "downsample.0",
         "shortcut.2": "downsample.2"}
INNER_RE = r"(norm1|norm2|conv1|conv2|shortcut\.0|shortcut\.2)\.(weight|bias)"
DECODER_SCALE = {0: 8, 1: 4, 2: 2, 3: 1}   # x8_resb (1/8 of the input) first

# ours -> official, from unet3D: conv1, layer0..4 (NoBottleneck), fusionConv = [GN, ReLU, conv],
# x8/x4/x2/x1_resb (one NoBottleneck each), precls_conv = [GN, ReLU, Conv3d], GAP = [GN, ReLU, pool], controller
DODNET = [
    (r"stem\.weight", "conv1.weight"),
    (rf"encoder_stages\.(\d)\.(\d)\.{INNER_RE}", lambda m: f"layer{m[1]}.{m[2]}.{INNER[m[3]]}.{m[4]}"),
    (r"fusion\.([02])\.(weight|bias)", r"fusionConv.\1.\2"),
    (rf"decoder_blocks\.(\d)\.{INNER_RE}", lambda m: f"x{DECODER_SCALE[int(m[1])]}_resb.0.{INNER[m[2]]}.{m[3]}"),
    (r"pre_head\.([02])\.(weight|bias)", r"precls_conv.\1.\2"),
    (r"gap_norm\.(weight|bias)", r"GAP.0.\1"),
    (r"controller\.(weight|bias)", r"controller.\1"),
]


def transdodnet(levels):
    """ours -> official, from ResCNN_DeformTR (TransDoDNet.py), ResNet (ResCNN2.py) and DeformableTransformer
    (deformable_transformer.py); ``levels`` = backbone levels (stem + stages), official 5."""
    top = levels - 2   # the official decoder names its steps by level: stage3 (deepest skip) .. stage0
    stem = {"0.0": "conv1", "0.1": "norm1", "1.0": "conv2", "1.1": "norm2"}
    # DeformableTransformerDecoderLayer.forward_post: self-attention -> dropout2 -> norm2,
    # cross-attention -> dropout1 -> norm1, FFN -> dropout4 -> norm3; ours are numbered in that order
    decoder_norm = {"1": "norm2", "2": "norm1", "3": "norm3"}
    return [
        (r"backbone\.stem\.(\d\.\d)\.(weight|bias)", lambda m: f"backbone.{stem[m[1]]}.{m[2]}"),
        (r"backbone\.stages\.(\d)\.(\d)\.shortcut\.([01])\.(weight|bias)",
         lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.downsample.{m[3]}.{m[4]}"),
        (r"backbone\.stages\.(\d)\.(\d)\.(.+)", lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.{m[3]}"),
        (r"input_proj\.(.+)", r"input_proj.\1"),
        (r"encoder\.level_embed", "transformer.level_embed"),
        (r"encoder\.layers\.(.+)", r"transformer.encoder.layers.\1"),
        (r"query_embed\.weight", "query_embed.weight"),
        (r"reference_points\.(weight|bias)", r"transformer.reference_points.\1"),
        (r"decoder_layers\.(\d)\.norm([123])\.(weight|bias)",
         lambda m: f"transformer.decoder.layers.{m[1]}.{decoder_norm[m[2]]}.{m[3]}"),
        (r"decoder_layers\.(\d)\.(.+)", r"transformer.decoder.layers.\1.\2"),
        (r"controller\.(.+)", r"controller.\1"),
        (r"memory_proj\.(.+)", r"memory_conv3_l0.\1"),
        (r"bottleneck_proj\.(.+)", r"cnn_bottle.\1"),
        (r"skip_projs\.(\d)\.(.+)", lambda m: f"shortcut_conv{top - int(m[1])}.{m[2]}"),
        (r"upconvs\.(\d)\.weight", lambda m: f"transposeconv_stage{top - int(m[1])}.weight"),
        (r"decoder_blocks\.(\d)\.(.+)", lambda m: f"stage{top - int(m[1])}_de.{m[2]}"),
        (r"pre_head\.(.+)", r"precls_conv.\1"),
    ]


# ours -> official (Prompt_generic_UNet.py: UniSeg_model(Generic_UNet)); 3 stages, 2 convs per stage:
# conv_blocks_context.0 = StackedConvLayers_multi_channel (block 0: conv_1/conv_2/conv_4 + one instnorm),
# conv_blocks_context.1, conv_blocks_context.2 = Sequential(StackedConvLayers(1 conv), StackedConvLayers(1 conv)),
# conv_blocks_localization.u = Sequential(StackedConvLayers(1), StackedConvLayers(1)), tu.u, seg_outputs.u,
# intermedia_prompt, fusion_layer = StackedFusionConvLayers (3 ConvDropoutNormNonlin blocks)
UNISEG = [
    (r"encoder\.stages\.0\.0\.convs\.0\.conv\.convs\.(\d)\.(weight|bias)", r"conv_blocks_context.0.blocks.0.conv_\1.\2"),
    (r"encoder\.stages\.([01])\.0\.convs\.(\d)\.(conv|norm)\.(weight|bias)",
     lambda m: f"conv_blocks_context.{m[1]}.blocks.{m[2]}.{V1_LAYER[m[3]]}.{m[4]}"),
    (r"encoder\.stages\.2\.0\.convs\.(\d)\.(conv|norm)\.(weight|bias)",
     lambda m: f"conv_blocks_context.2.{m[1]}.blocks.0.{V1_LAYER[m[2]]}.{m[3]}"),
    (r"decoder\.stages\.(\d)\.convs\.(\d)\.(conv|norm)\.(weight|bias)",
     lambda m: f"conv_blocks_localization.{m[1]}.{m[2]}.blocks.0.{V1_LAYER[m[3]]}.{m[4]}"),
    (r"decoder\.transpconvs\.(\d)\.weight", r"tu.\1.weight"),
    (r"decoder\.seg_layers\.(\d)\.weight", r"seg_outputs.\1.weight"),
    (r"universal_prompt", "intermedia_prompt"),
    (r"fuse\.convs\.(\d)\.(conv|norm)\.(weight|bias)", lambda m: f"fusion_layer.blocks.{m[1]}.{V1_LAYER[m[2]]}.{m[3]}"),
]
