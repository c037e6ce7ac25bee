from lace_jax.serve.server import main

main()
