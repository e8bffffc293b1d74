"""Multi-task (universal) datasets for nnU-Net: combine, sample, train, predict, export.

Shared by UniSeg, DoDNet, TransDoDNet (and VerSemi): ONE network trained on SEVERAL partially labelled
datasets, with the task id telling the network what to segment. Adding a task is data, not code:
the number of tasks, their classes and channels come from the dataset metadata only.

Design note
===========

Workflow::

    nnunet-plugins combine -d 501 502 503 -o 600 -n Universal      # raw datasets -> Dataset600_Universal
    nnUNetv2_plan_and_preprocess -d 600 -c 3d_fullres               # stock nnU-Net
    nnUNetv2_train 600 3d_fullres 0 -tr UniSegTrainer               # any MultiTaskTrainer subclass
    nnunet-plugins predict-multitask -d 600 -tr UniSegTrainer -f 0 -i IMAGES -o OUT [--task TAG]
                                     [--source-labels OUT_SRC]      # per-task prediction (+ source labels)
    nnunet-plugins export-multitask -d 600 -i OUT -o OUT_SRC        # combined labels -> source labels
    nnunet-plugins uniseg-backbone -m MODEL_FOLDER -f 0 -d 601      # UniSeg only: backbone for fine-tuning

    predict-multitask: ``-npp 0 -nps 0`` runs without worker processes (small jobs, tests).

Combined dataset (``combine``)
    case names ``<tag>_<source case>`` (tag: letters/digits, the source dataset's name by default);
    labels: disjoint union, ``"<tag>:<name>"`` -> combined value, background 0 shared; images
    normalised per source with the source's nnU-Net scheme and statistics, every channel declared
    ``noNorm``; narrower tasks padded with zero channels; geometry kept (nnU-Net's planner picks the
    one target spacing; ``-overwrite_target_spacing`` fixes it).

Metadata: ``dataset.json["multitask"]`` (``metadata.MultiTaskSpec.to_json``)::

    {"format": 1, "num_input_channels": C_max,
     "tasks": [{"tag", "source_dataset", "channel_names" (source), "label_names" (local order),
                "label_values" (source value per local class), "combined_labels" (combined value per
                local class), "normalization" (per source channel: scheme, use_mask_for_norm,
                intensity_properties), "source_labels", "source_regions_class_order",
                "source_file_ending", "num_training", "num_test"}, ...]}

    Task id t = position in "tasks". Local class i of task t: 0 = background, K_t classes.
    ``MultiTaskSpec.from_dataset_json`` also reads a PLAIN nnU-Net dataset as one implicit task, so
    every multi-task trainer trains single datasets too. ``MultiTaskTrainer`` copies the metadata into
    the plans of the model folder (``plans["multitask"]``; read it with
    ``MultiTaskTrainer.task_spec_from_plans(plans_manager)``, as ``network_context`` does).

Conventions
    * batches: ``batch["data"]``, ``batch["target"]`` (combined label values, nnU-Net's deep
      supervision list), ``batch["task_id"]``: LongTensor (B,); every batch holds one task
      (``sampling.MultiTaskDataLoader``: task-balanced rounds, numpy's global RNG, works with
      ``nnUNet_n_proc_DA`` > 0 and with a single task);
    * networks: ``forward(x, task_id=None)`` with ``task_id`` a LongTensor (B,); ``set_inference_task(t)``
      sets the task used when ``forward`` gets none; with neither, ``forward`` raises RuntimeError (so the
      stock ``nnUNetv2_predict`` fails clearly). With deep supervision: a list, highest resolution first;
    * partial labels (``partial_labels``): for a sample of task t the loss sees only
      ``task_output_channels(spec, t)`` of the output and the target in t's local indices; the other
      tasks' channels get no loss and no gradient from it.

Extension points (``nnunet_plugins.trainers.multitask.MultiTaskTrainer``; override only these)
    ``network_class`` (the multi-task network, built by its ``from_plans``), ``task_output_channels`` and
    ``task_label_manager`` (classmethods (spec, task): which output channels are a task's local
    classes, and how they become a segmentation - softmax by default, regions for sigmoid heads),
    ``compute_loss(output, batch)`` (default: nnU-Net's Dice+CE per task on the selected channels;
    ``self.task_label_mapper.to_local`` converts targets),
    ``logits_to_local_segmentation`` (online pseudo Dice), ``configure_optimizers``,
    ``batches_per_task_per_round`` (UniSeg: 50).

Modules: ``metadata`` (pure Python), ``intensity`` and ``combine`` (dataset combination),
``training.sampling`` (sampler + loader), ``partial_labels`` (label tables in torch, partial-label loss),
``prediction`` (``MultiTaskPredictor``, export to source labels). Import them directly; this package
``__init__`` imports nothing heavy.
"""
from nnunet_plugins.multitask.metadata import METADATA_KEY, MultiTaskSpec, TaskSpec  # noqa: F401
