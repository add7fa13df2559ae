"""What every loop that trains or samples shares: random draws derived from (seed, step), the
torch.distributed set-up, and the optimizer. Leaf modules: they import nothing else of elucidate,
so both the diffusion loop and the VAE loop use them without depending on each other."""
