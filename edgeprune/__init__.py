"""edgeprune's model side: what happens to a model on the host before any device sees it.

Modules, from the model to the artifact::

    sources, models, zoo          a model from any source (built-in, checkpoint, MODULE:CALLABLE, model file)
    data, datasets, workload,     eval/calibration/fine-tune data from any source, split and preprocessed;
      shards                      eval shards (inputs + labels + reference outputs) for the agents
    prune, prune_groups,          structured channel pruning (Torch-Pruning), hardware alignment, plans;
      sparsity, sensitivity       2:4 sparsity; per-layer sensitivity
    channels                      channel counting (no torch: the host's search plans candidates with it)
    finetune, recovery            recovering accuracy after pruning (recalibrate → fine-tune → distil)
    export, exporters/            one verified artifact per device format (one module per format)
    errors                        every exception the project raises on purpose (the CLI maps them to exit codes)

It never imports :mod:`host`; the device side (:mod:`agent`) never imports it.
"""
