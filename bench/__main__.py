from bench.runner import main

# Guarded: the load generators are spawned processes, which import this
# module again under another name.
if __name__ == "__main__":
    main()
