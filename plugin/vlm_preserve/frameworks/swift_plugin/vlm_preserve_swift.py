# The file ms-swift's `--external_plugins` imports (`vlm-preserve swift-plugin` prints its path). It lies alone in
# its folder because ms-swift puts that folder on sys.path. Everything is in vlm_preserve.frameworks.swift.
from vlm_preserve.frameworks.swift import register

register()
