"""``python -m inferstack.gateway.routing.build_native``: compile the routing pick ahead (`routing.native`; run by
scripts/setup.sh) and print the library's path. Its own module: ``-m`` on `routing.native`, which the package
imports, would run it twice."""

from inferstack.gateway.routing.native import build

if __name__ == "__main__":
    print(build())
