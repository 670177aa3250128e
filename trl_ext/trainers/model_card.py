"""The model card that cites the papers of the losses a trainer actually used.

TRL's trainers write a model card (`create_model_card`, called by `save_model` and at each checkpoint) that cites one
paper per trainer class: DPO for `trl.DPOTrainer`, whatever `loss_type` was trained. trl_ext's trainers cite the
papers of the losses in `loss_type` instead, and tag the model with the loss names.
"""

from ..citations import Citation
from ..trl_contract import model_card_paper_of_class, set_model_card_paper


def model_card_paper(citations: list[Citation], fallback: dict) -> dict:
    """TRL's paper dictionary for the card: the first paper for the sentence "a method introduced in ...", the
    BibTeX entries of all of them, in order and without repeats; `fallback` (the trainer class's) if none."""
    unique = list(dict.fromkeys(citations))
    if not unique:
        return fallback
    return {"title": unique[0].title, "id": unique[0].arxiv_id,
            "citation": "\n\n".join(citation.bibtex for citation in unique)}


class CitesItsLosses:
    """Mixin for a TRL trainer: its model card cites `loss_papers()` (TRL's class paper if none) and is tagged with
    the names in `loss_type`."""

    def loss_papers(self) -> list[Citation]:
        raise NotImplementedError

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        set_model_card_paper(self, model_card_paper(self.loss_papers(), model_card_paper_of_class(type(self))))
        loss_types = [self.args.loss_type] if isinstance(self.args.loss_type, str) else self.args.loss_type
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(model_name, dataset_name, [*tags, *loss_types])
