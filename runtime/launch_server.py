"""`python -m arborlm.runtime.launch_server [--model-path P] [--port 30000] ...`"""

from arborlm.runtime.server.launch import main

if __name__ == "__main__":
    main()
