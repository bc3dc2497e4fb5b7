"""Several GPUs (or, on a CPU, several processes over gloo) for one video: wan22.request.parallel_layout says how,
`context` is one rank's part in a denoise, `group` starts and drives the other ranks from rank 0."""
