def main():
    from .knowledge_base import KnowledgeBase
    KnowledgeBase.load()
